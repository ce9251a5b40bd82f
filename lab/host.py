"""The host side of the lab: where QEMU, the guest kernel, busybox and cpio are.

Everything the lab runs comes from Debian packages (:data:`APT_PACKAGES`). A missing piece raises
:class:`~tmdht.lab.errors.LabSetupError` whose message says which packages to install.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tmdht.lab.errors import LabSetupError

__all__ = [
    "APT_PACKAGES",
    "DEFAULT_BUSYBOX",
    "DEFAULT_KERNEL_GLOB",
    "QEMU_BINARY",
    "HostTools",
    "file_sha256",
    "find_busybox",
    "find_kernel",
    "find_program",
    "qemu_version",
]

APT_PACKAGES: Final = (
    "qemu-system-x86",
    "qemu-utils",
    "linux-image-cloud-amd64",
    "busybox-static",
    "cpio",
)
"""Debian packages that provide everything the lab needs."""

QEMU_BINARY: Final = "qemu-system-x86_64"
DEFAULT_KERNEL_GLOB: Final = "/boot/vmlinuz-*-cloud-amd64"
DEFAULT_BUSYBOX: Final = Path("/bin/busybox")

_INSTALL_HINT: Final = "install them with: apt-get install -y " + " ".join(APT_PACKAGES)
_PT_INTERP: Final = 3
_MAX_PROGRAM_HEADERS: Final = 256


def _setup_error(what: str) -> LabSetupError:
    return LabSetupError(f"{what}; the guest lab needs Debian packages {', '.join(APT_PACKAGES)} — "
                         f"{_INSTALL_HINT}")


def _version_key(path: str) -> list[int | str]:
    """Sort key that orders ``vmlinuz-6.1.0-9`` before ``vmlinuz-6.1.0-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def find_kernel(pattern: str = DEFAULT_KERNEL_GLOB) -> Path:
    """Return the newest kernel matching ``pattern`` (the Debian cloud kernel by default)."""
    matches = sorted(glob.glob(pattern), key=_version_key)
    if not matches:
        raise _setup_error(f"no guest kernel matches {pattern}")
    return Path(matches[-1])


def find_program(name: str) -> Path:
    """Return the absolute path of program ``name`` on ``PATH``."""
    found = shutil.which(name)
    if found is None:
        raise _setup_error(f"{name} is not installed (not on PATH)")
    return Path(found)


def _is_static_elf(path: Path) -> bool:
    """Whether ``path`` is a 64-bit little-endian ELF without a program interpreter."""
    with path.open("rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return False
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        if phentsize < 4 or phnum > _MAX_PROGRAM_HEADERS:
            return False
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    if len(table) < phentsize * phnum:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != _PT_INTERP
               for i in range(phnum))


def find_busybox(path: Path = DEFAULT_BUSYBOX) -> Path:
    """Return the static busybox (a dynamic one cannot run alone in the initramfs)."""
    if not path.is_file():
        raise _setup_error(f"{path} does not exist")
    if not _is_static_elf(path):
        raise _setup_error(f"{path} is not a static x86-64 executable (package busybox-static)")
    return path


@functools.cache
def qemu_version(qemu: Path) -> str:
    """The first line of ``qemu --version`` (e.g. ``QEMU emulator version 7.2.22 (...)``)."""
    try:
        done = subprocess.run([str(qemu), "--version"], capture_output=True, text=True,
                              timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise _setup_error(f"cannot run {qemu} --version ({exc})") from exc
    return done.stdout.splitlines()[0].strip() if done.stdout else "unknown"


@functools.cache
def _cached_sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime)."""
    stat = path.stat()
    return _cached_sha256(path, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class HostTools:
    """The host programs and files a guest is built and run with."""

    qemu: Path
    """``qemu-system-x86_64``."""
    kernel: Path
    """The guest kernel (``/boot/vmlinuz-*-cloud-amd64``)."""
    busybox: Path
    """The static busybox copied into the initramfs."""
    cpio: Path
    """GNU cpio, which writes the initramfs archive."""

    @classmethod
    def discover(cls) -> HostTools:
        """Find every tool, raising :class:`LabSetupError` naming the packages if one is missing."""
        return cls(qemu=find_program(QEMU_BINARY), kernel=find_kernel(),
                   busybox=find_busybox(), cpio=find_program("cpio"))

    def qemu_version(self) -> str:
        """QEMU's version line (part of every capture's cache key)."""
        return qemu_version(self.qemu)
