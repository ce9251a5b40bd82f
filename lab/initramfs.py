"""The guest's initramfs: a static busybox and the lab's ``/init`` script, nothing else.

The archive is a gzip'd newc cpio written by GNU cpio with fixed owners, modes, mtimes and inode
numbers and compressed without a timestamp, so the same busybox and script always give the same
bytes: the archive's hash can key caches.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Final

from tmdht.files import atomic_write
from tmdht.lab.errors import LabSetupError
from tmdht.lab.host import find_busybox, find_program

__all__ = [
    "DISTRIBUTION_BUDGET",
    "DISTRIBUTION_CANDIDATES",
    "DISTRIBUTION_DIR",
    "SERVER_INIT",
    "SERVER_WORKLOAD",
    "WORKLOADS",
    "build_initramfs",
    "distribution_files",
    "ensure_initramfs",
    "init_script",
    "server_init_script",
]

WORKLOADS: Final = ("idle", "files", "compute", "mixed")
"""Workloads the ``/init`` script knows (kernel command line ``tmdht.workload=NAME``)."""
SERVER_WORKLOAD: Final = "server"
"""The workload of ``/init-server`` (``lab/server.sh``), in the server initramfs only."""
SERVER_INIT: Final = "init-server"
"""Where the server initramfs holds ``lab/server.sh`` (booted with ``rdinit=/init-server``)."""
DISTRIBUTION_DIR: Final = "usr/lib/tmdht-dist"
"""Where the server initramfs holds the distribution (host files every server guest shares)."""
DISTRIBUTION_CANDIDATES: Final = (
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libm.so.6",
    "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
    "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
    "/usr/lib/x86_64-linux-gnu/libz.so.1",
    "/usr/lib/x86_64-linux-gnu/libzstd.so.1",
    "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libglib-2.0.so.0",
    "/usr/lib/x86_64-linux-gnu/libgio-2.0.so.0",
    "/usr/lib/x86_64-linux-gnu/libgnutls.so.30",
    "/usr/lib/x86_64-linux-gnu/libp11-kit.so.0",
    "/usr/lib/x86_64-linux-gnu/libunistring.so.2",
    "/usr/lib/x86_64-linux-gnu/libxml2.so.2",
    "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0",
    "/usr/lib/x86_64-linux-gnu/libsystemd.so.0",
    "/usr/bin/perl",
    "/usr/bin/python3.11",
)
"""Host files that make up the server guests' distribution, in order (missing ones skipped):
shared libraries and programs, the kind of page cache every server of a fleet holds alike."""
DISTRIBUTION_BUDGET: Final = 24 << 20
"""Bytes of distribution at most (it must fit a 128 MiB guest with room for its own data)."""

_FIXED_MTIME: Final = 946684800  # 2000-01-01T00:00:00Z: any constant works, zero looks broken
_DIRECTORIES: Final = ("bin", "dev", "proc", "sys", "tmp")
_CPIO_TIMEOUT_S: Final = 60.0


def init_script() -> str:
    """The text of the guest's ``/init`` (``lab/init.sh``)."""
    return importlib.resources.files("tmdht.lab").joinpath("init.sh").read_text(encoding="utf-8")


def server_init_script() -> str:
    """The text of the server guests' ``/init-server`` (``lab/server.sh``)."""
    return importlib.resources.files("tmdht.lab").joinpath("server.sh").read_text(
        encoding="utf-8")


def distribution_files(candidates: tuple[str, ...] = DISTRIBUTION_CANDIDATES,
                       budget: int = DISTRIBUTION_BUDGET) -> list[Path]:
    """The candidates that exist on this host, in order, while their total fits ``budget``."""
    chosen: list[Path] = []
    total = 0
    for name in candidates:
        path = Path(name)
        if not path.is_file():
            continue
        size = path.stat().st_size
        if total + size > budget:
            break
        chosen.append(path)
        total += size
    return chosen


def _server_members(staging: Path) -> list[str]:
    """Stage ``/init-server`` and the distribution; return the new members (files and dirs)."""
    (staging / SERVER_INIT).write_text(server_init_script(), encoding="utf-8")
    members = [SERVER_INIT]
    parts = Path(DISTRIBUTION_DIR).parts
    for depth in range(1, len(parts) + 1):
        directory = "/".join(parts[:depth])
        (staging / directory).mkdir(mode=0o755, exist_ok=True)
        members.append(directory)
    for path in distribution_files():
        member = f"{DISTRIBUTION_DIR}/{path.name}"
        (staging / member).write_bytes(path.read_bytes())
        members.append(member)
    return members


def build_initramfs(busybox: Path | None = None, cpio: Path | None = None, *,
                    server: bool = False) -> bytes:
    """Build the initramfs and return its bytes (gzip'd newc cpio, deterministic).

    ``server=True`` adds ``/init-server`` and the distribution for ``server`` guests (the
    default archive is unchanged by it, so are the caches keyed by its hash).
    """
    busybox = find_busybox() if busybox is None else busybox
    cpio = find_program("cpio") if cpio is None else cpio
    with tempfile.TemporaryDirectory(prefix="tmdht-initramfs-") as staging_name:
        staging = Path(staging_name)
        for directory in _DIRECTORIES:
            (staging / directory).mkdir(mode=0o755)
        (staging / "init").write_text(init_script(), encoding="utf-8")
        (staging / "bin" / "busybox").write_bytes(busybox.read_bytes())
        members = ["init", "bin/busybox", *_DIRECTORIES]
        if server:
            members += _server_members(staging)
        for member in members:
            (staging / member).chmod(0o755)
            os.utime(staging / member, (_FIXED_MTIME, _FIXED_MTIME))
        os.utime(staging, (_FIXED_MTIME, _FIXED_MTIME))
        archive = pack_cpio(staging, sorted([".", *members]), cpio)
    # The distribution makes the server archive 24 MiB: level 6 packs it about as tight, faster.
    return gzip.compress(archive, compresslevel=6 if server else 9, mtime=0)


def pack_cpio(staging: Path, members: list[str], cpio: Path) -> bytes:
    """A newc cpio archive of ``members`` (paths relative to ``staging``, in this order) with
    fixed owners (GNU cpio ``--reproducible``): the same files give the same bytes."""
    names = "".join(f"{name}\0" for name in members)
    try:
        done = subprocess.run(
            [str(cpio), "--create", "--format=newc", "--null", "--owner=0:0",
             "--reproducible", "--quiet"],
            input=names.encode(), cwd=staging, capture_output=True,
            timeout=_CPIO_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise LabSetupError(f"cannot run {cpio}: {exc}") from exc
    if done.returncode != 0:
        raise LabSetupError(f"{cpio} failed ({done.returncode}): "
                            f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def ensure_initramfs(directory: Path, busybox: Path | None = None,
                     cpio: Path | None = None, *, server: bool = False) -> Path:
    """Write the initramfs to ``directory/initramfs-<sha256 prefix>.cpio.gz`` unless present
    (``server=True``: the one with ``/init-server`` and the distribution).

    The name is derived from the content, so an existing file is always the right one; it is
    written to a temporary name first and renamed, so a file with that name is always complete.
    """
    data = build_initramfs(busybox, cpio, server=server)
    path = directory / f"initramfs-{hashlib.sha256(data).hexdigest()[:16]}.cpio.gz"
    if path.is_file() and path.stat().st_size == len(data):
        return path
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return path
