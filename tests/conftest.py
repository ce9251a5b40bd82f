"""Fixtures shared by every test package: the build directory and real guest captures.

Guest captures are slow to make the first time (about 30 s for the five default guests on two
cores) and cached in ``<repo>/build/guests/`` afterwards. When QEMU, the guest kernel, busybox or
cpio is missing the fixtures FAIL (they do not skip): the test command installs them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tmdht.lab import GuestCapture, HostTools, LabSetupError, capture_guests, default_specs
from tmdht.lab.initramfs import ensure_initramfs

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def build_dir() -> Path:
    """``<repo>/build``: the gitignored cache of guest captures and other build products."""
    path = REPO_ROOT / "build"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def lab_tools() -> HostTools:
    """QEMU, the guest kernel, busybox and cpio of this host (fails with the apt command)."""
    try:
        return HostTools.discover()
    except LabSetupError as exc:
        pytest.fail(f"guest lab unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def lab_initramfs(build_dir: Path, lab_tools: HostTools) -> Path:
    """The guests' initramfs, cached under ``build/lab/``."""
    path: Path = ensure_initramfs(build_dir / "lab", lab_tools.busybox, lab_tools.cpio)
    return path


@pytest.fixture(scope="session")
def guest_captures(build_dir: Path, lab_tools: HostTools) -> list[GuestCapture]:
    """Captures (migration stream + raw dump) of :func:`tmdht.lab.default_specs`, cached."""
    captures: list[GuestCapture] = capture_guests(build_dir, default_specs(), tools=lab_tools)
    return captures
