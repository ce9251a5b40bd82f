"""Guest laboratory: builds busybox guests, boots them under QEMU/TCG, captures their memory.

The lab is test and benchmark tooling, not part of the sans-IO core: it runs
``qemu-system-x86_64`` (TCG, q35) with the Debian cloud kernel and an initramfs holding a static
busybox and the lab's ``/init``, talks QMP to it and reads its serial console.

- :mod:`tmdht.lab.initramfs` builds the deterministic initramfs (workloads in ``init.sh``);
- :mod:`tmdht.lab.qmp` is a small synchronous QMP client;
- :mod:`tmdht.lab.guest` owns one QEMU process (:class:`Guest`), source or migration destination;
- :mod:`tmdht.lab.capture` captures and caches streams and memory dumps of guests.

Host requirements: the Debian packages in :data:`APT_PACKAGES`.
"""

from typing import TYPE_CHECKING

from tmdht.lab.console import SerialConsole
from tmdht.lab.errors import (
    CaptureError,
    GuestError,
    GuestTimeoutError,
    LabError,
    LabSetupError,
    MigrationError,
    QmpCommandError,
    QmpError,
    QmpTimeoutError,
)
from tmdht.lab.guest import (
    DEFAULT_FILE_BANDWIDTH,
    Guest,
    GuestSpec,
    MigrationStats,
    qemu_command,
)
from tmdht.lab.host import APT_PACKAGES, HostTools, find_kernel
from tmdht.lab.initramfs import WORKLOADS, build_initramfs, ensure_initramfs, init_script
from tmdht.lab.qmp import QmpClient, QmpEvent

if TYPE_CHECKING:
    from tmdht.lab.capture import GuestCapture, capture_guests, default_specs, load_capture

_LAZY_FROM_CAPTURE = frozenset({"GuestCapture", "capture_guests", "default_specs", "load_capture"})


def __getattr__(name: str) -> object:
    """Import :mod:`tmdht.lab.capture` on first use, so ``python -m tmdht.lab.capture`` runs it
    without importing it twice."""
    if name in _LAZY_FROM_CAPTURE:
        from tmdht.lab import capture  # noqa: PLC0415

        return getattr(capture, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "APT_PACKAGES",
    "DEFAULT_FILE_BANDWIDTH",
    "WORKLOADS",
    "CaptureError",
    "Guest",
    "GuestCapture",
    "GuestError",
    "GuestSpec",
    "GuestTimeoutError",
    "HostTools",
    "LabError",
    "LabSetupError",
    "MigrationError",
    "MigrationStats",
    "QmpClient",
    "QmpCommandError",
    "QmpError",
    "QmpEvent",
    "QmpTimeoutError",
    "SerialConsole",
    "build_initramfs",
    "capture_guests",
    "default_specs",
    "ensure_initramfs",
    "find_kernel",
    "init_script",
    "load_capture",
    "qemu_command",
]
