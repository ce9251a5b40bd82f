"""A small busybox guest under QEMU/TCG, owned by a context manager.

:class:`Guest` starts ``qemu-system-x86_64`` as its own child process and always kills (by PID) and
reaps it on exit. Its serial console and QMP monitor are unix sockets in a private temporary
directory; the lab listens on them and QEMU connects as a client, so starting needs no polling for
socket files: the lab blocks in ``accept`` with a timeout while watching the process.

A source and a destination of a migration are built from the same :class:`GuestSpec` and get the
same command line (devices, memory, kernel, initramfs); the destination only adds ``-incoming``.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from tmdht.lab.console import SerialConsole
from tmdht.lab.errors import (
    GuestError,
    GuestTimeoutError,
    MigrationError,
    QmpError,
    QmpTimeoutError,
    UsageError,
)
from tmdht.lab.host import APT_PACKAGES, HostTools
from tmdht.lab.initramfs import SERVER_INIT, SERVER_WORKLOAD, WORKLOADS, ensure_initramfs
from tmdht.lab.qmp import QmpClient

__all__ = [
    "APT_PACKAGES",
    "DEFAULT_FILE_BANDWIDTH",
    "TERMINAL_MIGRATION_STATES",
    "Guest",
    "GuestSpec",
    "MigrationStats",
    "qemu_command",
]

DEFAULT_FILE_BANDWIDTH: Final = 8 << 30
"""max-bandwidth (bytes/s) for migrations to a file: QEMU's default cap is 128 MiB/s, even there."""
TERMINAL_MIGRATION_STATES: Final = frozenset({"completed", "failed", "cancelled"})
"""Migration states after which nothing more happens."""

_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MIN_MEMORY_MIB: Final = 64
_MAX_MEMORY_MIB: Final = 1 << 16
_MAX_SEED: Final = (1 << 31) - 1
_MAX_DIRTY_MIB_S: Final = 4096
_MAX_UNIX_PATH: Final = 100
_ACCEPT_SLICE_S: Final = 0.25
_REAP_TIMEOUT_S: Final = 10.0
_MAX_WAIT_ITERATIONS: Final = 1 << 20
_MIGRATION_QUERY_SLICE_S: Final = 5.0
_EXIT_AFTER_QMP_LOSS_S: Final = 5.0
"""Seconds to let QEMU finish exiting once its QMP connection broke during a migration."""
_FINISH_MIGRATE_QUERIES: Final = 10_000  # query-status round trips (~0.1 ms each) at most
_LOG_TAIL_BYTES: Final = 4000


@dataclass(frozen=True, slots=True)
class GuestSpec:
    """What a lab guest runs; two guests with equal specs are built alike."""

    name: str
    """Short identifier (letters, digits, ``_.-``), used in file and directory names."""
    workload: str
    """One of :data:`tmdht.lab.initramfs.WORKLOADS`, or ``server`` (memory filled like a
    server's, ``lab/server.sh``; booted from the server initramfs)."""
    seed: int
    """Seed of the workload's data (0 … 2**31-1)."""
    memory_mib: int = 128
    """Guest RAM in MiB (``-m``)."""
    kaslr: bool = True
    """Kernel address space randomisation; ``False`` boots with ``nokaslr``."""
    dirty_mib_s: int = 0
    """``server`` only: MiB/s of fresh content the guest keeps writing once its memory is
    filled (0: none). Left out of capture keys while 0."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _NAME_PATTERN.fullmatch(self.name) is None:
            raise UsageError(f"bad guest name {self.name!r}: 1-64 of letters, digits, '_.-'")
        if self.workload not in (*WORKLOADS, SERVER_WORKLOAD):
            known = ", ".join((*WORKLOADS, SERVER_WORKLOAD))
            raise UsageError(f"unknown workload {self.workload!r}; known: {known}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed <= _MAX_SEED:
            raise UsageError(f"seed must be an integer in [0, {_MAX_SEED}], not {self.seed!r}")
        if isinstance(self.memory_mib, bool) or not isinstance(self.memory_mib, int) \
                or not _MIN_MEMORY_MIB <= self.memory_mib <= _MAX_MEMORY_MIB:
            raise UsageError(f"memory_mib must be in [{_MIN_MEMORY_MIB}, {_MAX_MEMORY_MIB}], "
                             f"not {self.memory_mib!r}")
        if not isinstance(self.kaslr, bool):
            raise UsageError(f"kaslr must be a bool, not {self.kaslr!r}")
        if isinstance(self.dirty_mib_s, bool) or not isinstance(self.dirty_mib_s, int) \
                or not 0 <= self.dirty_mib_s <= _MAX_DIRTY_MIB_S:
            raise UsageError(f"dirty_mib_s must be in [0, {_MAX_DIRTY_MIB_S}], "
                             f"not {self.dirty_mib_s!r}")
        if self.dirty_mib_s and not self.server:
            raise UsageError(f"dirty_mib_s needs the {SERVER_WORKLOAD} workload, "
                             f"not {self.workload!r}")

    @property
    def ram_bytes(self) -> int:
        """Guest RAM in bytes."""
        return self.memory_mib << 20

    @property
    def server(self) -> bool:
        """Whether the guest boots ``/init-server`` (it needs the server initramfs)."""
        return self.workload == SERVER_WORKLOAD

    def kernel_cmdline(self) -> str:
        """The kernel command line (``-append``)."""
        words = ["console=ttyS0", "quiet", "panic=-1",
                 f"tmdht.workload={self.workload}", f"tmdht.seed={self.seed}"]
        if self.server:
            words += [f"rdinit=/{SERVER_INIT}", f"tmdht.dirty={self.dirty_mib_s}"]
        if not self.kaslr:
            words.append("nokaslr")
        return " ".join(words)

    def cache_inputs(self) -> dict[str, Any]:
        """The spec as capture keys hash it: every field, except ``dirty_mib_s`` while 0 (so
        the keys of guests from before it existed stay the same)."""
        inputs = asdict(self)
        if not self.dirty_mib_s:
            del inputs["dirty_mib_s"]
        return inputs


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class MigrationStats:
    """The outcome of a migration, from ``query-migrate``."""

    status: str
    """``completed``, ``failed``, ``active``, …"""
    total_time_ms: int | None = None
    """Wall time from start to completion."""
    downtime_ms: int | None = None
    """Time the guest was paused."""
    setup_time_ms: int | None = None
    """Time spent setting up."""
    transferred_bytes: int | None = None
    """RAM bytes put on the wire."""
    normal_pages: int | None = None
    """Pages sent in full (re-sent dirty pages count again)."""
    zero_pages: int | None = None
    """Pages sent as ZERO records (QEMU's ``duplicate``)."""
    dirty_sync_count: int | None = None
    """Number of dirty bitmap syncs (iterations)."""
    error: str | None = None
    """QEMU's ``error-desc`` of a failed migration."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The whole ``query-migrate`` answer."""

    @classmethod
    def from_query(cls, info: dict[str, Any]) -> MigrationStats:
        """Build from a ``query-migrate`` answer."""
        ram_info = info.get("ram")
        ram: dict[str, Any] = ram_info if isinstance(ram_info, dict) else {}
        return cls(
            status=str(info.get("status", "none")),
            total_time_ms=_int_or_none(info.get("total-time")),
            downtime_ms=_int_or_none(info.get("downtime")),
            setup_time_ms=_int_or_none(info.get("setup-time")),
            transferred_bytes=_int_or_none(ram.get("transferred")),
            normal_pages=_int_or_none(ram.get("normal")),
            zero_pages=_int_or_none(ram.get("duplicate")),
            dirty_sync_count=_int_or_none(ram.get("dirty-sync-count")),
            error=info.get("error-desc") if isinstance(info.get("error-desc"), str) else None,
            raw=info,
        )

    def to_json(self) -> dict[str, Any]:
        """The summary fields as a JSON-ready dict (without ``raw``)."""
        return {"status": self.status, "total_time_ms": self.total_time_ms,
                "downtime_ms": self.downtime_ms, "setup_time_ms": self.setup_time_ms,
                "transferred_bytes": self.transferred_bytes, "normal_pages": self.normal_pages,
                "zero_pages": self.zero_pages, "dirty_sync_count": self.dirty_sync_count,
                "error": self.error}


def qemu_command(spec: GuestSpec, tools: HostTools, initramfs: Path, *, serial_socket: Path,
                 qmp_socket: Path, incoming: str | None = None,
                 extra_args: Sequence[str] = ()) -> list[str]:
    """The QEMU command line of a guest; source and destination differ only in ``-incoming``.

    QEMU's default devices are kept (VGA, e1000e NIC, their ROMs) so that streams contain the
    RAM blocks of a typical q35 VM. The serial console and the QMP monitor are client sockets to
    ``serial_socket`` and ``qmp_socket``, on which the caller must listen.
    """
    for path in (serial_socket, qmp_socket):
        if "," in str(path):
            raise UsageError(f"socket path {path} contains a comma (QEMU option syntax)")
    command = [
        str(tools.qemu),
        "-name", f"tmdht-{spec.name}",
        "-machine", "q35,accel=tcg",
        "-m", str(spec.memory_mib),
        "-kernel", str(tools.kernel),
        "-initrd", str(initramfs),
        "-append", spec.kernel_cmdline(),
        "-display", "none",
        "-no-reboot",
        "-chardev", f"socket,id=tmdht-serial,path={serial_socket}",
        "-serial", "chardev:tmdht-serial",
        "-chardev", f"socket,id=tmdht-qmp,path={qmp_socket}",
        "-mon", "chardev=tmdht-qmp,mode=control",
        *extra_args,
    ]
    if incoming is not None:
        command += ["-incoming", incoming]
    return command


def _listen(path: Path) -> socket.socket:
    if len(str(path)) > _MAX_UNIX_PATH:
        raise UsageError(f"unix socket path too long ({len(str(path))} chars): {path}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
    except OSError:
        listener.close()
        raise
    return listener


class Guest:
    """A running lab guest (a QEMU child process), as a context manager.

    ``Guest(spec)`` boots a source; ``Guest(spec, incoming="defer")`` starts a destination that
    waits for :meth:`migrate_incoming`; ``incoming="unix:/path"`` (or any QEMU URI) listens at once.
    Nothing starts before :meth:`start` (or ``with``); :meth:`close` kills and reaps QEMU, closes
    the sockets and removes the private directory, also when the block raised.
    """

    def __init__(self, spec: GuestSpec, *, incoming: str | None = None,
                 tools: HostTools | None = None, initramfs: Path | None = None,
                 extra_args: Sequence[str] = (), start_timeout: float = 30.0,
                 tmp_root: Path | None = None, keep_workdir: bool = False) -> None:
        """Describe the guest; ``tools`` defaults to :meth:`HostTools.discover` and ``initramfs``
        to one built in the guest's private directory."""
        self.spec = spec
        """What the guest runs."""
        self.incoming = incoming
        """The ``-incoming`` argument (``None`` for a source)."""
        self._tools = tools
        self._initramfs = initramfs
        self._extra_args = tuple(extra_args)
        self._start_timeout = start_timeout
        self._tmp_root = tmp_root
        self._keep_workdir = keep_workdir
        self._workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QmpClient | None = None
        self._console: SerialConsole | None = None
        self._closed = False
        self.command: list[str] = []
        """The QEMU command line, once started."""

    # -- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> Guest:
        """Start QEMU and connect to its console and QMP monitor (enables MIGRATION events)."""
        if self._proc is not None or self._closed:
            raise UsageError(f"guest {self.spec.name} was already started")
        deadline = time.monotonic() + self._start_timeout
        try:
            tools = self._tools if self._tools is not None else HostTools.discover()
            self._workdir = Path(tempfile.mkdtemp(prefix=f"tmdht-{self.spec.name}-",
                                                  dir=self._tmp_root))
            if self._initramfs is not None:
                initramfs = self._initramfs.resolve()  # QEMU runs in the private directory
            else:
                initramfs = ensure_initramfs(self._workdir, tools.busybox, tools.cpio,
                                             server=self.spec.server)
            if not initramfs.is_file():
                raise UsageError(f"initramfs {initramfs} does not exist")
            serial_path = self._workdir / "serial.sock"
            qmp_path = self._workdir / "qmp.sock"
            self.command = qemu_command(self.spec, tools, initramfs, serial_socket=serial_path,
                                        qmp_socket=qmp_path, incoming=self.incoming,
                                        extra_args=self._extra_args)
            with _listen(serial_path) as serial_listener, _listen(qmp_path) as qmp_listener:
                with (self._workdir / "qemu.log").open("wb") as log:
                    self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                                  stdout=log, stderr=subprocess.STDOUT,
                                                  cwd=self._workdir, close_fds=True)
                # QEMU connects its chardevs in command-line order while it starts.
                self._console = SerialConsole(
                    self._accept(serial_listener, deadline, "serial console"))
                qmp_sock = self._accept(qmp_listener, deadline, "QMP monitor")
            try:
                self._qmp = QmpClient(qmp_sock, timeout=max(deadline - time.monotonic(), 1.0))
                self.set_migration_capabilities(events=True)
            except QmpError as exc:
                raise self._startup_failure(exc) from exc
            serial_path.unlink(missing_ok=True)
            qmp_path.unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise
        return self

    def _startup_failure(self, exc: QmpError) -> GuestError:
        """Explain a QMP failure while starting: usually QEMU exited (bad option or file)."""
        try:
            self._process().wait(timeout=_ACCEPT_SLICE_S)
        except subprocess.TimeoutExpired:
            return GuestError(f"QEMU of guest {self.spec.name} started but QMP failed: {exc}")
        return GuestError(f"QEMU of guest {self.spec.name} exited while starting ({exc}):\n"
                          f"{self.describe_failure()}")

    def _accept(self, listener: socket.socket, deadline: float, what: str) -> socket.socket:
        """Accept QEMU's connection, failing fast if QEMU exits instead."""
        for _slice in range(_MAX_WAIT_ITERATIONS):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            listener.settimeout(min(_ACCEPT_SLICE_S, remaining))
            try:
                conn, _address = listener.accept()
            except TimeoutError:
                if self._process().poll() is not None:
                    raise GuestError(
                        f"QEMU of guest {self.spec.name} exited with {self._process().returncode} "
                        f"before connecting its {what}:\n{self.qemu_log()}") from None
                continue
            return conn
        raise GuestTimeoutError(f"QEMU of guest {self.spec.name} did not connect its {what} "
                                f"within {self._start_timeout:.1f} s:\n{self.qemu_log()}")

    def close(self) -> None:
        """Kill (SIGKILL, by PID) and reap QEMU, close sockets, remove the private directory.

        Idempotent. Raises :class:`GuestError` only if QEMU survives SIGKILL for 10 s.
        """
        if self._closed:
            return
        self._closed = True
        if self._qmp is not None:
            self._qmp.close()
        if self._console is not None:
            self._console.close()
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                try:
                    self._proc.wait(timeout=_REAP_TIMEOUT_S)
                except subprocess.TimeoutExpired as exc:
                    raise GuestError(f"QEMU pid {self._proc.pid} survived SIGKILL") from exc
        finally:
            if self._workdir is not None and not self._keep_workdir:
                shutil.rmtree(self._workdir, ignore_errors=True)

    # -- state -----------------------------------------------------------------------------

    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise UsageError(f"guest {self.spec.name} is not started")
        return self._proc

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self._process().pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, ``None`` while it runs."""
        return self._process().poll()

    @property
    def workdir(self) -> Path:
        """The guest's private directory (removed by :meth:`close`)."""
        if self._workdir is None:
            raise UsageError(f"guest {self.spec.name} is not started")
        return self._workdir

    @property
    def qmp(self) -> QmpClient:
        """The QMP session, for commands the lab does not wrap."""
        if self._qmp is None:
            raise UsageError(f"guest {self.spec.name} is not started")
        return self._qmp

    @property
    def console(self) -> SerialConsole:
        """The serial console reader."""
        if self._console is None:
            raise UsageError(f"guest {self.spec.name} is not started")
        return self._console

    def socket_path(self, name: str) -> Path:
        """A path for a unix socket in the guest's private directory (e.g. a migration URI)."""
        path = self.workdir / f"{name}.sock"
        if len(str(path)) > _MAX_UNIX_PATH:
            raise UsageError(f"unix socket path too long: {path}")
        return path

    def qemu_log(self) -> str:
        """The tail of QEMU's own stdout/stderr."""
        if self._workdir is None:
            return ""
        try:
            data = (self._workdir / "qemu.log").read_bytes()
        except OSError:
            return ""
        return data[-_LOG_TAIL_BYTES:].decode("utf-8", errors="replace")

    def describe_failure(self) -> str:
        """QEMU's log and the console's last lines, for error messages."""
        return (f"QEMU exit status: {self._proc.poll() if self._proc else None}\n"
                f"QEMU log:\n{self.qemu_log()}\nconsole tail:\n"
                f"{self._console.tail() if self._console else ''}")

    # -- console ---------------------------------------------------------------------------

    @property
    def counter(self) -> int | None:
        """The last ``tmdht-counter`` value printed (reads what has already arrived)."""
        console = self.console
        console.pump(0.0)
        value: int | None = console.counter
        return value

    def wait_counter(self, min_value: int, timeout: float) -> int:
        """Wait until the guest printed a counter >= ``min_value``; return the value seen.

        Raises :class:`GuestError` if QEMU exits or the guest prints ``tmdht-error``, and
        :class:`GuestTimeoutError` after ``timeout`` seconds.
        """
        console = self.console
        deadline = time.monotonic() + timeout
        for _slice in range(_MAX_WAIT_ITERATIONS):
            console.pump(0.0)
            seen: int | None = console.counter
            if seen is not None and seen >= min_value:
                return seen
            if console.error_line is not None:
                raise GuestError(f"guest {self.spec.name} failed: {console.error_line}\n"
                                 f"{self.describe_failure()}")
            if console.eof or self._process().poll() is not None:
                raise GuestError(f"guest {self.spec.name} stopped before counter {min_value}:\n"
                                 f"{self.describe_failure()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            console.pump(min(remaining, 1.0))
        raise GuestTimeoutError(f"guest {self.spec.name} did not reach counter {min_value} "
                                f"within {timeout:.1f} s (last {console.counter}):\n"
                                f"{self.describe_failure()}")

    # -- QMP wrappers ----------------------------------------------------------------------

    def status(self) -> str:
        """The run state (``query-status``): ``running``, ``paused``, ``inmigrate``,
        ``postmigrate``, …"""
        return str(self.qmp.execute("query-status")["status"])

    def stop(self) -> None:
        """Pause the guest's CPUs."""
        self.qmp.execute("stop")

    def cont(self) -> None:
        """Resume the guest's CPUs."""
        self.qmp.execute("cont")

    def set_migration_parameters(self, **parameters: Any) -> None:
        """``migrate-set-parameters``; ``max_bandwidth=...`` becomes ``max-bandwidth``.

        E.g. ``max_bandwidth`` (bytes/s), ``downtime_limit`` (ms).
        """
        self.qmp.execute("migrate-set-parameters",
                         **{name.replace("_", "-"): value for name, value in parameters.items()})

    def migration_parameters(self) -> dict[str, Any]:
        """``query-migrate-parameters``."""
        return dict(self.qmp.execute("query-migrate-parameters"))

    def set_migration_capabilities(self, **capabilities: bool) -> None:
        """``migrate-set-capabilities``; ``zero_blocks=True`` becomes ``zero-blocks``."""
        self.qmp.execute("migrate-set-capabilities", capabilities=[
            {"capability": name.replace("_", "-"), "state": bool(state)}
            for name, state in capabilities.items()])

    def query_migrate(self) -> dict[str, Any]:
        """The raw ``query-migrate`` answer."""
        return dict(self.qmp.execute("query-migrate"))

    def migrate(self, uri: str) -> None:
        """Start migrating to ``uri`` (``exec:CMD``, ``tcp:HOST:PORT``, ``unix:PATH``).

        Returns once QEMU accepted the command; see :meth:`wait_migration`.
        """
        self.qmp.take_events("MIGRATION")
        self.qmp.execute("migrate", uri=uri)

    def migrate_incoming(self, uri: str) -> None:
        """Make a destination started with ``incoming="defer"`` listen on ``uri``.

        QEMU is listening when this returns, so the source may :meth:`migrate` at once.
        """
        self.qmp.take_events("MIGRATION")
        self.qmp.execute("migrate-incoming", uri=uri)

    def incoming_addresses(self) -> list[dict[str, Any]]:
        """Where a destination listens (``query-migrate`` ``socket-address``), e.g.
        ``[{"type": "inet", "host": "127.0.0.1", "port": "43643"}]`` after
        ``migrate_incoming("tcp:127.0.0.1:0")``: the way to learn a port-0 listener's port."""
        return [dict(address) for address in self.query_migrate().get("socket-address", [])]

    def incoming_tcp_port(self) -> int:
        """The TCP port a destination listens on (see :meth:`incoming_addresses`)."""
        for address in self.incoming_addresses():
            if address.get("type") == "inet":
                return int(address["port"])
        raise GuestError(f"guest {self.spec.name} is not listening on TCP for a migration")

    def wait_migration(self, timeout: float) -> MigrationStats:
        """Wait until the migration (outgoing, or incoming on a destination) completes.

        Blocks on MIGRATION events, re-checking ``query-migrate`` at least every 5 s. Returns
        the statistics of a completed migration; raises :class:`MigrationError` if it failed or
        was cancelled, :class:`GuestTimeoutError` after ``timeout`` seconds.

        A completed source is paused. QEMU announces ``completed`` just before it computes the
        total time and downtime and moves its run state from ``finish-migrate`` to
        ``postmigrate``; a source's statistics are returned once that happened (a query in
        between reads zeros: the demo once printed 0 ms for both).
        """
        deadline = time.monotonic() + timeout
        stats = self._migration_stats()
        for _slice in range(_MAX_WAIT_ITERATIONS):
            if stats.status in TERMINAL_MIGRATION_STATES:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeoutError(
                    f"migration of guest {self.spec.name} still {stats.status} after "
                    f"{timeout:.1f} s")
            if self._process().poll() is not None:
                raise MigrationError(f"QEMU of guest {self.spec.name} exited during migration:\n"
                                     f"{self.describe_failure()}")
            # On timeout re-query below anyway: the events capability may have been turned off.
            with contextlib.suppress(QmpTimeoutError):
                self.qmp.wait_event(
                    "MIGRATION", timeout=min(remaining, _MIGRATION_QUERY_SLICE_S),
                    predicate=lambda event: event.data.get("status")
                    in TERMINAL_MIGRATION_STATES)
            stats = self._migration_stats()
        if stats.status != "completed":
            raise MigrationError(f"migration of guest {self.spec.name} {stats.status}: "
                                 f"{stats.error or 'no error description'}")
        if stats.total_time_ms == 0:
            # A source that just announced ``completed`` computes its total time and downtime
            # only when it leaves ``finish-migrate`` (QEMU 7.2, migration_iteration_finish);
            # a query in between reads zeros. Wait for the run state (bounded), then re-query.
            for _turn in range(_FINISH_MIGRATE_QUERIES):
                if self.status() != "finish-migrate":
                    break
            stats = self._migration_stats()
        return stats

    def _migration_stats(self) -> MigrationStats:
        """``query-migrate`` during :meth:`wait_migration`. A QMP connection that breaks there is
        QEMU exiting (an incoming migration whose device state failed to load ends QEMU): that
        becomes a :class:`MigrationError` carrying QEMU's log, which says why."""
        try:
            return MigrationStats.from_query(self.query_migrate())
        except QmpError as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process().wait(timeout=_EXIT_AFTER_QMP_LOSS_S)  # let its log be complete
            raise MigrationError(
                f"QEMU of guest {self.spec.name} lost its QMP connection during migration "
                f"({exc}):\n{self.describe_failure()}") from exc

    def migrate_to_file(self, path: Path, *, timeout: float = 120.0,
                        max_bandwidth: int = DEFAULT_FILE_BANDWIDTH) -> MigrationStats:
        """Migrate into file ``path`` (``exec:cat > PATH``) and wait for completion.

        The guest keeps running while RAM is copied, so the stream holds re-sent dirty pages;
        afterwards the guest is paused (``postmigrate``) with the memory the stream ends with.
        """
        target = Path(path).resolve()
        self.set_migration_parameters(max_bandwidth=max_bandwidth)
        self.migrate(f"exec:cat > {shlex.quote(str(target))}")
        return self.wait_migration(timeout)

    def pmemsave(self, path: Path, *, size: int | None = None, timeout: float = 120.0) -> Path:
        """Save guest physical memory [0, size) (default: all RAM) to ``path`` (``pmemsave``)."""
        target = Path(path).resolve()
        self.qmp.execute("pmemsave", val=0, size=self.spec.ram_bytes if size is None else size,
                         filename=str(target), timeout=timeout)
        return target

    def dump_elf(self, path: Path, *, timeout: float = 300.0) -> Path:
        """Write an ELF core of guest memory (``dump-guest-memory``, paging off) to ``path``."""
        target = Path(path).resolve()
        self.qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{target}",
                         timeout=timeout)
        return target

    def quit(self, timeout: float = 30.0) -> int:
        """Ask QEMU to exit (``quit``) and reap it; returns its exit status."""
        self.qmp.execute("quit", timeout=timeout)
        try:
            return int(self._process().wait(timeout=timeout))
        except subprocess.TimeoutExpired as exc:
            raise GuestTimeoutError(f"QEMU of guest {self.spec.name} did not exit after quit") \
                from exc
