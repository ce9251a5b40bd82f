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
    "WORKLOADS",
    "build_initramfs",
    "ensure_initramfs",
    "init_script",
]

WORKLOADS: Final = ("idle", "files", "compute", "mixed")
"""Workloads the ``/init`` script knows (kernel command line ``tmdht.workload=NAME``)."""

_FIXED_MTIME: Final = 946684800  # 2000-01-01T00:00:00Z: any constant works, zero looks broken
_DIRECTORIES: Final = ("bin", "dev", "proc", "sys", "tmp")
_CPIO_TIMEOUT_S: Final = 60.0


def init_script() -> str:
    """The text of the guest's ``/init`` (``lab/init.sh``)."""
    return importlib.resources.files("tmdht.lab").joinpath("init.sh").read_text(encoding="utf-8")


def build_initramfs(busybox: Path | None = None, cpio: Path | None = None) -> bytes:
    """Build the initramfs and return its bytes (gzip'd newc cpio, deterministic)."""
    busybox = find_busybox() if busybox is None else busybox
    cpio = find_program("cpio") if cpio is None else cpio
    with tempfile.TemporaryDirectory(prefix="tmdht-initramfs-") as staging_name:
        staging = Path(staging_name)
        for directory in _DIRECTORIES:
            (staging / directory).mkdir(mode=0o755)
        (staging / "init").write_text(init_script(), encoding="utf-8")
        (staging / "bin" / "busybox").write_bytes(busybox.read_bytes())
        members = ["init", "bin/busybox", *_DIRECTORIES]
        for member in members:
            (staging / member).chmod(0o755)
            os.utime(staging / member, (_FIXED_MTIME, _FIXED_MTIME))
        os.utime(staging, (_FIXED_MTIME, _FIXED_MTIME))
        archive = pack_cpio(staging, sorted([".", *members]), cpio)
    return gzip.compress(archive, compresslevel=9, mtime=0)


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
                     cpio: Path | None = None) -> Path:
    """Write the initramfs to ``directory/initramfs-<sha256 prefix>.cpio.gz`` unless present.

    The name is derived from the content, so an existing file is always the right one; it is
    written to a temporary name first and renamed, so a file with that name is always complete.
    """
    data = build_initramfs(busybox, cpio)
    path = directory / f"initramfs-{hashlib.sha256(data).hexdigest()[:16]}.cpio.gz"
    if path.is_file() and path.stat().st_size == len(data):
        return path
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return path
