"""The receiver's read path alone: CPU seconds to take N MiB off a loopback connection.

Three ways, alternating, each in a fresh receiver process on uvloop (as ``tmdht qemu receive``
runs): ``plaintext`` (asyncio streams, the plaintext receiver's path), ``tls-transport``
(uvloop's SSL transport under a StreamReader, the receiver's TLS path before issue 18's
profile) and ``tls-socket`` (:class:`tmdht.client.tls_stream.TlsStream`, the path now). The
sender is another process writing 256 KiB at a time, then closing (without a TLS
close_notify, as the tmdht sender does). Reported: the receiver's CPU seconds (user + system)
from the first byte to the last, and the bytes it got: uvloop's SSL transport loses up to a few
hundred KiB already received when the peer closes so (the tmdht sender closes only after the
receiver's verdict, so migrations never hit it); medians over ``--repeat`` runs.

    python bench/tls_receive.py [--mib 256] [--repeat 5] [--mbit 100]

``--mbit`` paces the sender (16 KiB writes at that average rate): at a link's pace records
arrive a few at a time, so what each wake-up of the receiver costs shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.tls import ScratchCA  # noqa: E402

CHUNK = 256 << 10
WAYS = ("plaintext", "tls-transport", "tls-socket")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _receive(way: str, creds: Path, total: int) -> dict[str, float]:
    from tmdht.client.tls import TlsConfig, server_context  # noqa: PLC0415
    from tmdht.client.tls_stream import TlsStream  # noqa: PLC0415

    context = server_context(TlsConfig(creds)) if way != "plaintext" else None
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(listener)
    listener.close()
    if way == "tls-socket":
        assert context is not None
        stream = await TlsStream.accept(conn, context, 30, CHUNK)
        read = stream.read
    elif way == "tls-transport":
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        await loop.connect_accepted_socket(lambda: protocol, conn, ssl=context)
        read = reader.read
    else:
        reader, _writer = await asyncio.open_connection(sock=conn)
        read = reader.read
    got = len(await read(CHUNK))
    began, cpu = time.perf_counter(), _cpu()
    while got < total:
        data = await read(CHUNK)
        if not data:
            break
        got += len(data)
    return {"cpu_s": _cpu() - cpu, "wall_s": time.perf_counter() - began, "bytes": got}


def _send(port: int, creds: Path | None, total: int, mbit: float) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if creds is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(creds / "ca-cert.pem"))
        context.load_cert_chain(str(creds / "client-cert.pem"), str(creds / "client-key.pem"))
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    size = CHUNK if not mbit else 16 << 10  # paced: one TLS record's worth at a time
    block = os.urandom(size)
    began = time.perf_counter()
    for index in range(total // size):
        if mbit:  # hold the average rate: a link's pace, not loopback's
            ahead = began + index * size * 8 / (mbit * 1e6) - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        sock.sendall(block)
    sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--mbit", type=float, default=0.0,
                        help="pace the sender at this many Mbit/s (default: as fast as it can)")
    parser.add_argument("--role", choices=["receive", "send"], help=argparse.SUPPRESS)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--creds", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / "tls-receive.json")
    args = parser.parse_args(argv)
    total = args.mib << 20
    if args.role == "receive":
        import uvloop  # noqa: PLC0415

        print(json.dumps(uvloop.run(_receive(args.way, args.creds, total))), flush=True)
        return 0
    if args.role == "send":
        _send(args.port, args.creds, total, args.mbit)
        return 0
    load = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="tlsperf-receive-") as tmp:
        ca = ScratchCA(Path(tmp) / "ca")
        recv = ca.creds(Path(tmp) / "recv", server=ca.issue("s", "/CN=r", server=True))
        send = ca.creds(Path(tmp) / "send", client=ca.issue("c", "/CN=s", server=False))
        me = [sys.executable, __file__, "--mib", str(args.mib)]
        for rep in range(args.repeat):
            for way in WAYS[rep % 3:] + WAYS[:rep % 3]:
                receiver = subprocess.Popen([*me, "--role", "receive", "--way", way, "--creds",
                                             str(recv)], stdout=subprocess.PIPE, text=True)
                assert receiver.stdout is not None
                port = receiver.stdout.readline().strip()
                creds = [] if way == "plaintext" else ["--creds", str(send)]
                subprocess.run([*me, "--role", "send", "--port", port, "--mbit",
                                str(args.mbit), *creds], check=True, timeout=600)
                runs[way].append(json.loads(receiver.stdout.readline()))
                receiver.wait(60)
    pace = f"paced at {args.mbit:g} Mbit/s" if args.mbit else "unpaced"
    print(f"receiver CPU to read {args.mib} MiB on loopback ({pace}), uvloop, {args.repeat} runs each "
          f"(medians; load average {load[0]:.1f}, shared machine)")
    medians = {way: {k: statistics.median(r[k] for r in rows) for k in ("cpu_s", "wall_s")}
               for way, rows in runs.items()}
    for way, m in medians.items():
        print(f"{way:<14} CPU {m['cpu_s']:.3f} s ({args.mib / m['cpu_s']:.0f} MiB per CPU s), "
              f"wall {m['wall_s']:.3f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"mib": args.mib, "mbit": args.mbit, "repeat": args.repeat,
                                    "load": load,
                                    "runs": runs, "medians": medians}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
