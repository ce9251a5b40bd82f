"""Errors of the guest lab, all rooted at :class:`tmdht.errors.TmdhtError`.

They say what went wrong and where: the host lacks a tool (:class:`LabSetupError`), QEMU refused
a QMP command or the QMP conversation broke (:class:`QmpError`), a guest did not behave
(:class:`GuestError`), a migration failed (:class:`MigrationError`), a capture could not be made
(:class:`CaptureError`); a bad argument is the caller's :class:`~tmdht.errors.UsageError`
(re-exported here). Waits that run out of time raise the ``...TimeoutError`` variants, which
are also :class:`TimeoutError` so generic code can catch them.
"""

from __future__ import annotations

from tmdht.errors import TmdhtError, UsageError

__all__ = [
    "CaptureError",
    "GuestError",
    "GuestTimeoutError",
    "LabError",
    "LabSetupError",
    "MigrationError",
    "QmpCommandError",
    "QmpError",
    "QmpTimeoutError",
    "UsageError",
]


class LabError(TmdhtError):
    """Root of the errors the guest lab raises."""


class LabSetupError(LabError):
    """The host lacks something the lab needs (QEMU, the guest kernel, busybox, cpio)."""


class QmpError(LabError):
    """The QMP conversation with QEMU failed: no connection, closed socket, bad message."""


class QmpTimeoutError(QmpError, TimeoutError):
    """QEMU did not answer (or send the awaited event) in time."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error.

    ``error_class`` is QEMU's class (e.g. ``GenericError``, ``CommandNotFound``) and ``desc`` its
    human-readable description.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP command {command!r} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class GuestError(LabError):
    """A guest did not behave: QEMU exited, failed to start, or the guest printed an error."""


class GuestTimeoutError(GuestError, TimeoutError):
    """A guest did not reach the awaited state in time."""


class MigrationError(GuestError):
    """A migration ended in ``failed`` or ``cancelled`` (the description is QEMU's)."""


class CaptureError(LabError):
    """A guest capture could not be made or a cached capture is unusable."""
