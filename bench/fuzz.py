"""Fuzz every decoder of bytes from outside: mutations of valid inputs, seeded and repeatable.

Decoders: the native burst decoder of PAGES answers, differentially against the reference
(``pages_burst``: any disagreement is a crash), likewise its PUT_RESULT answers
(``put_result``) and the node's native PUT_PAGES decoder (``put_request``), the data-plane wire codec (open-mode auth, so mutations reach the body parser instead
of all failing the tag check; each mutant is decoded as is and, when it still holds an open-mode
auth block, once more with its body length pointed at that block, so insertions and deletions
in a body or a page bulk reach the parsers too), the dedup stream decoder, the template catalog reader, the QEMU
migration stream parser, the node config (TOML), and the overlay's datagram decoding (plus the
validation of node_info / find_node answers). For each, inputs are made from valid seeds by 1-4
random mutations (bit flips, interesting integers at random offsets, inserted / deleted /
duplicated ranges, truncation, splicing two seeds) with a seeded ``random.Random``.

Invariant checked per input: the decoder returns, or raises its documented error type
(``DecodeError``; ``ConfigError`` for the config), within ``--time-limit`` seconds (an interval
timer interrupts a hang). Anything else is a crash: its type, message and input are recorded.

    python bench/fuzz.py                         # 1M inputs per decoder, all cores
    python bench/fuzz.py --inputs 20000 --decoders wire,config

Prints a table (decoder, inputs, seconds, distinct errors, crashes, hangs, slowest input) and
writes JSON (--out, default bench/results/fuzz.json). Crashing inputs go to --crash-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tmdht import wire
from tmdht.auth import AUTH_OVERHEAD, Authenticator
from tmdht.catalog import TemplateCatalog
from tmdht.catalog_file import TemplateDigests
from tmdht.config import NodeConfig
from tmdht.dedup_stream import DedupDecoder, DedupEncoder
from tmdht.domains import FailureDomain
from tmdht.errors import ConfigError, DecodeError
from tmdht.images import RamBlock
from tmdht.migration_stream import Need, SenderRewriter
from tmdht.net.overlay import (
    PeerInfo,
    decode_datagram,
    encode_request,
    encode_response,
    parse_contacts,
    parse_peer_info,
)
from tmdht.pages import PAGE_SIZE, ZERO_PAGE, PageDigest, digest_page
from tmdht.qemu_stream import QemuStreamParser, QemuStreamWriter, RamBlockInfo

NOW = 1_700_000_000.0


class Hang(Exception):
    """Raised by the interval timer when one input takes longer than the time limit."""


# ----------------------------------------------------------------------------------------------
# Seeds and targets: (seeds, run(data), allowed error type)


def _pages(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(PAGE_SIZE) for _ in range(n)]


_OPEN_BLOCK_START = b"\x00\x01"  # key id 0, auth flags OPEN
_OPEN_TAG = bytes(16)


def _relocate_open_auth_block(data: bytes) -> bytes | None:
    """``data`` with its header's body length set to find the first open-mode auth block
    after the header (the block sits between body and bulk), or None if there is none or the
    length already points at it."""
    at = wire.HEADER_SIZE
    for _ in range(64):  # bounded: mutants hold few candidates
        at = data.find(_OPEN_BLOCK_START, at)
        if at < 0 or at + AUTH_OVERHEAD > len(data):
            return None
        if data[at + AUTH_OVERHEAD - 16 : at + AUTH_OVERHEAD] == _OPEN_TAG:
            length = (at - wire.HEADER_SIZE).to_bytes(4, "big")
            if data[16:20] == length:
                return None
            return data[:16] + length + data[20:]
        at += 1
    return None


def wire_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    auth = Authenticator.open_mode()  # no replay window: the same nonce may recur in mutants
    pages = _pages(3, 1)
    digests = tuple(PageDigest(digest_page(p)) for p in pages)
    mx = 32768
    messages: list[Any] = [
        wire.GetPages(request_id=1, digests=digests),
        wire.Has(request_id=2, digests=digests),
        wire.NodeInfoRequest(request_id=3),
        wire.PutPages(request_id=4, pages=tuple(zip(digests, pages, strict=True))[:2]),
        wire.Error.capped(request_id=5, code=wire.ErrorCode.INTERNAL, message="boom"),
    ]
    seeds = [wire.encode(m, max_datagram=mx, auth=auth, now=NOW) for m in messages]
    seeds += wire.encode_pages_response(
        6, list(zip(digests, pages, strict=True))[:1], list(digests[1:]), max_datagram=mx,
        auth=auth, now=NOW,
    )  # fmt: skip
    seeds += wire.encode_put_response(
        7, [(digests[0], wire.PutStatus.STORED), (digests[1], wire.PutStatus.REJECTED_FULL)],
        max_datagram=mx, auth=auth, now=NOW,
    )  # fmt: skip
    seeds += wire.encode_have_response(8, [True, False, True], max_datagram=mx, auth=auth, now=NOW)
    seeds += _range_seeds(auth)
    seeds += wire.encode_pages_response(
        9, list(zip(digests, pages, strict=True)), [], max_datagram=mx, auth=auth, now=NOW
    )

    def run(data: bytes) -> object:
        relocated = _relocate_open_auth_block(data)
        if relocated is not None:
            with contextlib.suppress(DecodeError):
                wire.decode(relocated, max_datagram=wire.MAX_DATAGRAM, auth=auth, now=NOW)
        return wire.decode(data, max_datagram=wire.MAX_DATAGRAM, auth=auth, now=NOW)

    return seeds, run, DecodeError


def _differential(
    auths: tuple[Authenticator, ...],
    decode_both: Callable[[bytes, Authenticator], tuple[object, object]],
) -> Callable[[bytes], object]:
    """A differential run: each input (and its relocated twin) is decoded natively and by the
    reference (``decode_both``: message or DecodeError each) under every authenticator, and the
    two must agree (the same message, or the same error class and message); a disagreement is
    a crash. Returns the message a mode accepted, else raises the error of the mode that got
    furthest."""
    from tmdht.auth import AuthenticationError  # noqa: PLC0415

    def check(data: bytes) -> object:
        result: object = None
        error: DecodeError | None = None
        for auth in auths:
            mine, ref = decode_both(data, auth)
            if isinstance(mine, DecodeError) or isinstance(ref, DecodeError):
                if type(mine) is not type(ref) or str(mine) != str(ref):
                    raise AssertionError(f"native {mine!r} != reference {ref!r}")
                assert isinstance(mine, DecodeError)
                if error is None or not isinstance(mine, AuthenticationError):
                    error = mine
            elif mine != ref:
                raise AssertionError("native and reference decoded different messages")
            else:
                result = mine
        if result is None and error is not None:
            raise error
        return result

    def run(data: bytes) -> object:
        relocated = _relocate_open_auth_block(data)
        if relocated is not None:
            with contextlib.suppress(DecodeError):
                check(relocated)
        return check(data)

    return run


def _burst_differential(opened: Authenticator, keyed: Authenticator) -> Callable[[bytes], object]:
    """:func:`_differential` of the client's burst decoder: native against the reference."""
    from tmdht import _native  # noqa: PLC0415 - only these targets need the extension
    from tmdht.net.burst import decode_burst_native, decode_burst_reference  # noqa: PLC0415

    def decode_both(data: bytes, auth: Authenticator) -> tuple[object, object]:
        (mine,) = decode_burst_native([data], auth=auth, now=NOW, native=_native)
        (ref,) = decode_burst_reference([data], auth=auth, now=NOW)
        return mine, ref

    return _differential((opened, keyed), decode_both)


def pages_burst_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    """The native burst decoder of PAGES answers (tmdht._native.decode_pages_burst through
    tmdht.net.burst), differentially: each input (and its relocated twin) is decoded natively
    and by the reference, open mode and keyed, and the two must agree (same message, or same
    error class and message); a disagreement is a crash."""
    from tmdht.auth import ClusterKey, KeyRing  # noqa: PLC0415

    ring = KeyRing(ClusterKey(7, bytes(range(32))))
    opened, keyed = Authenticator.open_mode(), Authenticator(keyring=ring, replay=None)
    pages = _pages(4, 6)
    pairs = [(PageDigest(digest_page(p)), p) for p in pages]
    missing = [PageDigest(bytes([i]) * 32) for i in range(3)]
    seeds: list[bytes] = []
    for auth in (opened, keyed):
        for found, absent, mx in ((pairs[:1], missing, 32768), (pairs, [], 32768),
                                  (pairs, missing, wire.MIN_DATAGRAM), ([], missing, 32768)):
            seeds += wire.encode_pages_response(11, found, absent, max_datagram=mx, auth=auth,
                                                now=NOW)
    seeds += wire.encode_have_response(12, [True, False], max_datagram=32768, auth=opened, now=NOW)

    return seeds, _burst_differential(opened, keyed), DecodeError


def put_result_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    """The client's native PUT_RESULT decoder (tmdht._native.decode_pages_burst through
    tmdht.net.burst), differentially against the reference burst decoder, open mode and keyed:
    the same message, or the same error class and message; a disagreement is a crash."""
    from tmdht.auth import ClusterKey, KeyRing  # noqa: PLC0415

    ring = KeyRing(ClusterKey(7, bytes(range(32))))
    opened, keyed = Authenticator.open_mode(), Authenticator(keyring=ring, replay=None)
    digests = [PageDigest(digest_page(p)) for p in _pages(4, 9)]
    results = [(digests[i % 4], status) for i, status in enumerate(wire.PutStatus)]
    seeds: list[bytes] = []
    for auth in (opened, keyed):
        seeds += wire.encode_put_response(15, results, max_datagram=32768, auth=auth, now=NOW)
        seeds += wire.encode_put_response(16, results[:1], max_datagram=32768, auth=auth, now=NOW)
        seeds += wire.encode_put_response(17, results * 30, max_datagram=wire.MIN_DATAGRAM,
                                          auth=auth, now=NOW)[:2]

    return seeds, _burst_differential(opened, keyed), DecodeError


def put_request_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    """The node's native PUT_PAGES decoder (tmdht._native.decode_put_pages through
    tmdht.net.burst.decode_request_native), differentially against tmdht.wire.decode, open mode
    and keyed: the same message, or the same error class and message; a disagreement is a
    crash. Other types are handed to the reference by design (seeds of a few are mutated into
    PUT_PAGES by the type byte)."""
    from tmdht import _native  # noqa: PLC0415 - only this target needs the extension
    from tmdht.auth import ClusterKey, KeyRing  # noqa: PLC0415
    from tmdht.net.burst import decode_request_native  # noqa: PLC0415

    ring = KeyRing(ClusterKey(7, bytes(range(32))))
    opened, keyed = Authenticator.open_mode(), Authenticator(keyring=ring, replay=None)
    pages = _pages(4, 8)
    pairs = tuple((PageDigest(digest_page(p)), p) for p in pages)
    seeds: list[bytes] = []
    for auth in (opened, keyed):
        for count, mx in ((1, 32768), (4, 32768), (1, wire.MIN_DATAGRAM)):
            seeds.append(wire.encode(wire.PutPages(request_id=13, pages=pairs[:count]),
                                     max_datagram=mx, auth=auth, now=NOW))
        seeds += wire.encode_put_response(14, [(pairs[0][0], wire.PutStatus.STORED)],
                                          max_datagram=32768, auth=auth, now=NOW)

    def decode_both(data: bytes, auth: Authenticator) -> tuple[object, object]:
        outcomes: list[object] = []
        for decode, kwargs in ((decode_request_native, {"native": _native}), (wire.decode, {})):
            try:
                outcomes.append(decode(data, max_datagram=wire.MAX_DATAGRAM, auth=auth, now=NOW,
                                       **kwargs))
            except DecodeError as exc:
                outcomes.append(exc)
        return outcomes[0], outcomes[1]

    run = _differential((opened, keyed), decode_both)
    return seeds, run, DecodeError


def _incremental(decoder: Callable[[], Any]) -> Callable[[bytes], object]:
    """Run a fresh incremental decoder (feed, events, close) over one input."""

    def run(data: bytes) -> object:
        dec = decoder()
        dec.feed(data)
        events = list(dec.events())
        dec.close()
        return events

    return run


def dedup_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    pool = _pages(6, 2)
    catalog = TemplateCatalog.from_digests([digest_page(p) for p in pool[:3]])
    seeds = []
    for layout in ([0, 1, 3, None, None, 4, 2], [None] * 5, [3, 3, 5], [0]):
        pages = [ZERO_PAGE if i is None else pool[i] for i in layout]
        enc = DedupEncoder(
            catalog.catalog_id, (RamBlock("ram", len(pages) * PAGE_SIZE),), catalog.contains
        )
        seeds.append(enc.start() + enc.encode_pages(pages) + enc.finish())

    return seeds, _incremental(DedupDecoder), DecodeError


def catalog_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    seeds = [
        TemplateCatalog.from_digests([digest_page(p) for p in _pages(n, 3 + n)]).to_bytes()
        for n in (0, 1, 5)
    ]
    return seeds, TemplateCatalog.from_bytes, DecodeError


def qemu_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    w = QemuStreamWriter()
    pool = _pages(3, 4)
    infos = [RamBlockInfo("pc.ram", 4 * PAGE_SIZE), RamBlockInfo("vga.rom", PAGE_SIZE)]
    out = [w.header(), w.configuration("pc-q35-7.2")]
    out += [w.section_start(2, "ram", 0, 4), w.mem_size(infos), w.eos(), w.footer(2)]
    out.append(w.section_part(2, end=False))
    out += [w.page("pc.ram", 0, pool[0]), w.zero("pc.ram", PAGE_SIZE), w.page("vga.rom", 0, pool[1])]
    out += [w.eos(), w.footer(2), w.section_part(2, end=True), w.page("pc.ram", 0, pool[2])]
    out += [w.eos(), w.footer(2)]
    out.append(b"\x04\x00\x00\x00\x05\x06timer\x00\x00\x00\x00\x00\x00\x00\x02\x01\x02\x03\x7e")
    full = b"".join(out)
    seeds = [full, full[: len(full) // 2]]

    return seeds, _incremental(QemuStreamParser), DecodeError


def _qemu_seeds() -> list[bytes]:
    seeds, _run, _allowed = qemu_target()
    return seeds


def _migration_seeds() -> tuple[list[bytes], TemplateCatalog]:
    """Forward streams (hello, RAW, PAGE, ZPAGE, TEMPLATE, BACKREF, DEVICE, END, FALLBACK) of a
    small synthetic migration, plain and compressed, whole and cut."""
    pool = _pages(4, 5)
    pool.append(bytes(4095) + b"\x01")  # compresses: a ZPAGE
    catalog = TemplateCatalog.from_digests([digest_page(p) for p in pool[:2]])
    w = QemuStreamWriter()
    infos = [RamBlockInfo("pc.ram", 8 * PAGE_SIZE), RamBlockInfo("vga.rom", PAGE_SIZE)]
    out = [w.header(), w.configuration("pc-q35-7.2")]
    out += [w.section_start(2, "ram", 0, 4), w.mem_size(infos), w.eos(), w.footer(2)]
    out.append(w.section_part(2, end=True))
    for i, page in enumerate([pool[0], pool[2], pool[0], pool[4], pool[1], pool[3]]):
        out.append(w.page("pc.ram", i * PAGE_SIZE, page))
    out += [w.zero("pc.ram", 7 * PAGE_SIZE), w.page("vga.rom", 0, pool[2]), w.eos(), w.footer(2)]
    out.append(b"\x04\x00\x00\x00\x05\x06timer\x00\x00\x00\x00\x00\x00\x00\x02\x01\x02\x03\x7e")
    stream = b"".join(out)
    seeds = []
    for compress in (False, True):
        sender = SenderRewriter(catalog.catalog_id, lambda ds: [catalog.contains(d) for d in ds],
                                compress=compress, backref_window=4, flow_window=1 << 20)
        wire = sender.start() + sender.feed(stream) + sender.finish()
        # pool[1] (body 4) is a template the "cluster" below lacks: its FALLBACK is valid
        seeds += [wire + sender.fallback(Need((4,))), wire, wire[: len(wire) // 2]]
    return seeds, catalog


def native_qemu_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    """The native sender's QEMU stream parser (and the records it writes)."""
    from tmdht.native import NativeSender  # noqa: PLC0415

    catalog = TemplateCatalog.from_digests([digest_page(p) for p in _pages(3, 4)[:2]])
    templates = TemplateDigests(catalog.catalog_id, catalog.digests.tobytes())

    def run(data: bytes) -> object:
        sender = NativeSender(templates, backref_window=2, compress=len(data) % 2 == 0)
        sender.start()
        half = len(data) // 2
        out = sender.feed(data[:half]) + sender.feed(data[half:])
        return out + sender.finish()

    return _qemu_seeds(), run, DecodeError


def _receive(receiver: Any, pages: dict[bytes, bytes], data: bytes) -> object:
    half = len(data) // 3
    out = []
    for piece in (data[:half], data[half:]):
        receiver.feed(piece)
        indices, digests = receiver.wanted_batch(64)
        known = [(i, pages.get(digests[32 * k : 32 * k + 32])) for k, i in enumerate(indices)]
        receiver.supply_batch([i for i, p in known if p], [p for _, p in known if p])
        receiver.unavailable([i for i, p in known if not p])
        receiver.requests()
        out += receiver.output()
        receiver.ack(4096)
    receiver.close()
    return out


def migration_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    """The reference receiver (forward-stream decoder, rebuild, verification)."""
    from tmdht.native import ReferenceReceiver  # noqa: PLC0415

    seeds, _catalog = _migration_seeds()
    pages = {digest_page(p): p for p in _pages(4, 5)[:1]}
    return seeds, lambda data: _receive(ReferenceReceiver(), pages, data), DecodeError


def native_migration_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    """The native receiver (forward-stream decoder, rebuild, verification)."""
    from tmdht.native import NativeReceiver  # noqa: PLC0415

    seeds, _catalog = _migration_seeds()
    pages = {digest_page(p): p for p in _pages(4, 5)[:1]}
    return seeds, lambda data: _receive(NativeReceiver(), pages, data), DecodeError


def config_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    seeds = [
        b'[node]\ndata_dir = "/var/lib/tmdht"\nseeds = ["10.0.0.1:7400", "[::1]:7500"]\n'
        b'capacity = "2GiB"\nreplicas = 2\nrate_limit = 1000.5\nlog_format = "text"\n',
        b'data_dir = "x"\nkademlia_port = 0\ninsecure_open = true\nmax_datagram = "32KiB"\n'
        b'replication_interval = 0.5\nstatus_file = "/run/s.json"\nadvertise_host = ""\n',
    ]

    def run(data: bytes) -> object:
        return NodeConfig.from_sources(toml_text=data.decode("latin-1"))

    return seeds, run, ConfigError


def overlay_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    msg_id = bytes(range(20))
    info = PeerInfo(bytes(20), "127.0.0.1", 7401, 7402, "0.1.0").to_wire()
    advertised = PeerInfo(bytes(20), "", 7401, 0, "0.2.0", FailureDomain("z", "r", "h"),
                          virtual_ids=4, replicas=3).to_wire()  # the optional fields
    seeds = [
        encode_response(msg_id, advertised),
        encode_request(msg_id, "ping", [bytes(20)]),
        encode_request(msg_id, "find_node", [bytes(20), bytes(range(1, 21))]),
        encode_request(msg_id, "node_info", [bytes(20)]),
        encode_response(msg_id, info),
        encode_response(msg_id, [[bytes(20), "127.0.0.1", 7400], [bytes(range(20)), "::1", 1]]),
    ]

    def run(data: bytes) -> object:
        message = decode_datagram(data)
        value = getattr(message, "value", None)
        if isinstance(value, dict):
            return parse_peer_info(value)
        if isinstance(value, list):
            return parse_contacts(value)
        return message

    return seeds, run, DecodeError


def _range_seeds(auth: Authenticator) -> list[bytes]:
    """RANGE_HASH queries and RANGE_HASHES answers (anti-entropy) at each descent level."""
    messages: list[Any] = [
        wire.RangeHashQuery(request_id=20, bucket_bits=16, group_bits=12, first=0, groups=16,
                            mask=b"\xff" * 8192),
        wire.RangeHashQuery(request_id=21, bucket_bits=16, group_bits=6, first=4096, groups=64,
                            mask=b"\x5a" * 512),
        wire.RangeHashQuery(request_id=22, bucket_bits=16, group_bits=0, first=640, groups=5,
                            mask=b"\x13"),
        wire.RangeHashes(request_id=23, bucket_bits=16, group_bits=12, first=0,
                         entries=tuple((i * 1000, bytes([i]) * 32) for i in range(16))),
        wire.RangeHashes(request_id=24, bucket_bits=16, group_bits=0, first=7, entries=((3, bytes(32)),)),
    ]
    return [wire.encode(m, max_datagram=32768, auth=auth, now=NOW) for m in messages]


def range_hash_target() -> tuple[list[bytes], Callable[[bytes], object], type[Exception]]:
    """The wire codec from RANGE_HASH / RANGE_HASHES seeds only (mutations land in their bodies)."""
    _, run, allowed = wire_target()
    return _range_seeds(Authenticator.open_mode()), run, allowed


TARGETS: dict[str, Callable[[], tuple[list[bytes], Callable[[bytes], object], type[Exception]]]] = {
    "wire": wire_target,
    "range_hash": range_hash_target,
    "pages_burst": pages_burst_target,
    "put_request": put_request_target,
    "put_result": put_result_target,
    "dedup_stream": dedup_target,
    "catalog": catalog_target,
    "qemu_stream": qemu_target,
    "native_qemu_stream": native_qemu_target,
    "migration_stream": migration_target,
    "native_migration_stream": native_migration_target,
    "config": config_target,
    "overlay": overlay_target,
}

# ----------------------------------------------------------------------------------------------
# Mutator

_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x1000, 0x10000,
                0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1]  # fmt: skip


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        n = len(data)
        if op == 0 and n:  # flip a bit
            i = rng.randrange(n)
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an interesting byte
            data[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 2 and n:  # an interesting integer, big or little endian, 1/2/4/8 bytes
            width = rng.choice((1, 2, 4, 8))
            at = rng.randrange(max(1, n - width + 1))
            value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            data[at : at + width] = value.to_bytes(width, rng.choice(("big", "little")))
        elif op == 3:  # insert random bytes
            at = rng.randrange(n + 1)
            data[at:at] = rng.randbytes(rng.choice((1, 2, 4, 16, 64)))
        elif op == 4 and n:  # delete a range
            at = rng.randrange(n)
            del data[at : at + rng.choice((1, 2, 4, 16, 256))]
        elif op == 5 and n:  # duplicate a range
            at = rng.randrange(n)
            size = rng.choice((1, 4, 32, 512))
            data[at:at] = data[at : at + size]
        elif op == 6 and n:  # truncate
            del data[rng.randrange(n) :]
        elif op == 7:  # splice with another seed
            other = rng.choice(seeds)
            data = data[: rng.randrange(n + 1)] + other[rng.randrange(len(other) + 1) :]
        elif op == 8 and n:  # a random byte
            data[rng.randrange(n)] = rng.randrange(256)
    return bytes(data)


# ----------------------------------------------------------------------------------------------
# Runner


@dataclass
class Result:
    decoder: str
    inputs: int = 0
    seconds: float = 0.0
    accepted: int = 0
    rejected: int = 0
    distinct_errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    crashes: int = 0
    crash_examples: list[dict[str, str]] = field(default_factory=list)
    hangs: int = 0
    slowest_ms: float = 0.0
    seed: int = 0


_DIGITS = re.compile(r"0x[0-9a-f]+|\d+")


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang


def fuzz_one(name: str, inputs: int, seed: int, time_limit: float, crash_dir: str) -> Result:
    seeds, run, allowed = TARGETS[name]()
    run(seeds[0])  # the first seed is valid (others may be prefixes, kept for their bytes)
    rng = random.Random(f"{name}:{seed}")
    result = Result(name, seed=seed)
    messages: set[str] = set()
    kinds: dict[str, int] = {}
    signal.signal(signal.SIGALRM, _on_alarm)
    started = time.perf_counter()
    slowest = 0.0
    for _ in range(inputs):
        data = mutate(rng, seeds)
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        try:
            try:
                run(data)
            finally:  # disarmed before any handler runs: a late alarm must not escape one
                signal.setitimer(signal.ITIMER_REAL, 0)
            result.accepted += 1
        except Hang:
            result.hangs += 1
            _save(crash_dir, name, "hang", data, result)
        except allowed as exc:
            result.rejected += 1
            messages.add(f"{type(exc).__name__}: {_DIGITS.sub('N', str(exc))[:120]}")
            kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
        except BaseException as exc:  # anything else is what we look for (a native panic too)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            result.crashes += 1
            _save(crash_dir, name, f"{type(exc).__name__}: {exc}"[:300], data, result)
        slowest = max(slowest, time.perf_counter() - t0)
    result.inputs = inputs
    result.seconds = round(time.perf_counter() - started, 2)
    result.distinct_errors = len(messages)
    result.error_kinds = kinds
    result.slowest_ms = round(slowest * 1000, 3)
    return result


def _save(crash_dir: str, name: str, what: str, data: bytes, result: Result) -> None:
    if len(result.crash_examples) >= 20:
        return
    path = Path(crash_dir) / f"{name}-{len(result.crash_examples)}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    result.crash_examples.append({"error": what, "input": str(path)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per decoder")
    parser.add_argument("--decoders", default=",".join(TARGETS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=1.0, help="seconds per input")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fuzz.json"))
    parser.add_argument("--crash-dir", default="build/fuzz-crashes")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.decoders.split(",") if n.strip()]
    unknown = set(names) - set(TARGETS)
    if unknown:
        parser.error(f"unknown decoder(s): {', '.join(sorted(unknown))}")
    started = time.perf_counter()
    jobs = [(n, args.inputs, args.seed, args.time_limit, args.crash_dir) for n in names]
    with multiprocessing.get_context("fork").Pool(min(args.workers, len(jobs))) as pool:
        results = pool.starmap(fuzz_one, jobs, chunksize=1)
    wall = time.perf_counter() - started
    header = f"{'decoder':<13} {'inputs':>10} {'seconds':>8} {'inputs/s':>9} {'accepted':>9} " \
             f"{'distinct errors':>15} {'crashes':>7} {'hangs':>5} {'slowest ms':>10}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.decoder:<13} {r.inputs:>10,} {r.seconds:>8.1f} {r.inputs / r.seconds:>9,.0f} "
            f"{r.accepted:>9,} {r.distinct_errors:>15,} {r.crashes:>7} {r.hangs:>5} "
            f"{r.slowest_ms:>10.2f}"
        )
    for r in results:
        for example in r.crash_examples[:5]:
            print(f"  {r.decoder}: {example['error']} ({example['input']})")
    doc = {
        "benchmark": "fuzz",
        "engine": "seeded mutation of valid seeds (bench/fuzz.py)",
        "time_limit_seconds": args.time_limit,
        "wall_seconds": round(wall, 1),
        "workers": min(args.workers, len(jobs)),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "results": [asdict(r) for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out} ({wall:.0f} s wall)")
    return 1 if any(r.crashes or r.hangs for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
