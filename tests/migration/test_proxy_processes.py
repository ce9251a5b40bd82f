"""`tmdht qemu send` / `receive` as processes on a synthetic QEMU stream (no guest): how they end
when the destination QEMU goes away."""

from __future__ import annotations

import os
import random
import selectors
import subprocess
from pathlib import Path

import pytest
from support.cli import Lines
from support.synthetic import qemu_stream

from tmdht.catalog import TemplateCatalog
from tmdht.cli.main import run_async
from tmdht.client.migration import QemuPipeClosed, _PipeOut
from tmdht.launch import tmdht_argv
from tmdht.pages import PAGE_SIZE, digest_page

PAGES = 4000  # 16 MiB: far more than a pipe holds, so the receiver is still writing


@pytest.fixture(scope="module")
def stream_and_catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("proxies")
    rng = random.Random(17)
    pages = [rng.randbytes(PAGE_SIZE) for _ in range(PAGES)]
    stream, _memory = qemu_stream(
        [("pc.ram", PAGES * PAGE_SIZE)], [[("pc.ram", i, page) for i, page in enumerate(pages)]]
    )
    (root / "qemu.bin").write_bytes(stream)
    TemplateCatalog.from_digests(sorted(digest_page(p) for p in pages[::8])).save(root / "c.tmc")
    return root / "qemu.bin", root / "c.tmc"


def read_some(pipe: object, timeout: float) -> bytes:
    """What the receiver wrote to QEMU first (bounded wait)."""
    with selectors.DefaultSelector() as sel:
        sel.register(pipe, selectors.EVENT_READ)  # type: ignore[arg-type]
        assert sel.select(timeout), "the receiver wrote nothing to QEMU"
    return pipe.read1(65536)  # type: ignore[attr-defined, no-any-return]


def test_receiver_ends_with_one_line_when_qemu_closes_its_pipe(
    stream_and_catalog: tuple[Path, Path],
) -> None:
    """Regression (issue 17): the destination QEMU's incoming pipe closed mid-migration; the
    receiver died with 'RuntimeError: unable to perform operation on <WriteUnixTransport
    closed=True ...>; the handler is closed' out of _receive -> out.write."""
    stream, catalog = stream_and_catalog
    receiver = subprocess.Popen(
        tmdht_argv("qemu", "receive", "--listen", "127.0.0.1:0", "--no-cluster",
                   "--accept-timeout", "60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert receiver.stdout is not None and receiver.stderr is not None
    err = Lines(receiver.stderr)
    port = err.wait_for("READY ", 60).rsplit(":", 1)[1]
    with stream.open("rb") as qemu_out:
        sender = subprocess.Popen(
            tmdht_argv("qemu", "send", "--catalog", catalog, "--to", f"127.0.0.1:{port}"),
            stdin=qemu_out,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    try:
        assert read_some(receiver.stdout, 60).startswith(b"QEVM")
        receiver.stdout.close()  # the destination QEMU goes away
        code = receiver.wait(timeout=60)
        rest = receiver.stderr.read().decode(errors="replace")
        sender.wait(timeout=60)
    finally:
        for proc in (receiver, sender):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    lines = [*err.seen, *rest.splitlines()]
    assert code == 1, lines
    assert not any("Traceback" in line or "RuntimeError" in line for line in lines), lines
    (error,) = [line for line in lines if line.startswith("Error: ")]
    assert "QEMU closed the migration pipe" in error
    assert "bytes of QEMU stream" in error  # how far it got
    assert sender.returncode != 0  # the source side reports the failure too


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_closed_qemu_pipe_is_one_typed_error_on_either_event_loop(loop: str) -> None:
    """uvloop raises RuntimeError on a closed pipe transport, asyncio fails drain(): both are
    QemuPipeClosed, which says how far the stream got."""
    read_end, write_end = os.pipe()

    async def main() -> str:
        out = _PipeOut(write_end)
        await out.open()
        await out.write([b"QEVM", bytes(1000)])
        os.close(read_end)  # QEMU goes away
        with pytest.raises(QemuPipeClosed) as closed:
            for _ in range(100):  # the first write after the close may still be buffered
                await out.write([bytes(65536)])
        await out.close()
        return str(closed.value)

    message = run_async(main(), loop)
    assert "QEMU closed the migration pipe after" in message and "bytes of QEMU stream" in message
