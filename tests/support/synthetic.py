"""Synthetic memory: page pools, raw images and QEMU migration streams built from scratch."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from tmdht.pages import PAGE_SIZE
from tmdht.qemu_stream import QemuStreamWriter, RamBlockInfo


def page_pool(count: int, seed: int) -> list[bytes]:
    """Distinct random non-zero pages."""
    rng = random.Random(seed)
    return [rng.randbytes(PAGE_SIZE) for _ in range(count)]


def mixed_pages(
    n: int, pool: list[bytes], seed: int, zero: float = 0.3, shared: float = 0.4
) -> list[bytes]:
    """Pages drawn as: zero, from a shared pool, or unique random."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = rng.random()
        if x < zero:
            out.append(bytes(PAGE_SIZE))
        elif x < zero + shared:
            out.append(pool[rng.randrange(len(pool))])
        else:
            out.append(rng.randbytes(PAGE_SIZE))
    return out


def write_raw(path: Path, pages: list[bytes]) -> Path:
    """A raw dump made of these pages."""
    path.write_bytes(b"".join(pages))
    return path


@dataclass
class StreamModel:
    """A QEMU stream under construction, and the memory it should decode to."""

    blocks: list[RamBlockInfo]
    memory: dict[str, bytearray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.memory = {b.name: bytearray(b.length) for b in self.blocks}


def qemu_stream(
    blocks: list[tuple[str, int]],
    rounds: list[list[tuple[str, int, bytes | None]]],
    *,
    device_state: bytes = b"\x04\x00\x00\x00\x05\x06timer\x00\x00\x00\x00\x00\x00\x00\x02"
    b"\x01\x02\x03\x7e\x00\x00\x00\x05",
    ram_section_id: int = 2,
) -> tuple[bytes, dict[str, bytes]]:
    """A precopy stream: START(ram), a PART per round but the last, END with the last round.

    Each round is a list of (block, page index, data or None for a ZERO record). Returns the
    stream and the final memory of each block (later copies win, unsent pages are zero).
    """
    w = QemuStreamWriter()
    infos = [RamBlockInfo(name, length) for name, length in blocks]
    memory = {name: bytearray(length) for name, length in blocks}
    out = [w.header(), w.configuration("pc-q35-7.2")]
    out += [w.section_start(ram_section_id, "ram", 0, 4), w.mem_size(infos), w.eos()]
    out.append(w.footer(ram_section_id))
    for i, records in enumerate(rounds):
        out.append(w.section_part(ram_section_id, end=i == len(rounds) - 1))
        for name, index, data in records:
            offset = index * PAGE_SIZE
            length = len(memory[name][offset : offset + PAGE_SIZE])
            if data is None:
                out.append(w.zero(name, offset))
                memory[name][offset : offset + length] = bytes(length)
            else:
                out.append(w.page(name, offset, data))
                memory[name][offset : offset + length] = data[:length]
        out += [w.eos(), w.footer(ram_section_id)]
    out += [device_state, b"\x00", b"\x06\x00\x00\x00\x02{}"]
    return b"".join(out), {k: bytes(v) for k, v in memory.items()}
