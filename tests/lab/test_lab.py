"""Tests of the guest lab: initramfs, QMP client, console, guests under QEMU, captures.

The QEMU tests boot real busybox guests under TCG (about 3 s each to the first counter line).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tmdht.images import open_image
from tmdht.lab import (
    APT_PACKAGES,
    WORKLOADS,
    CaptureError,
    Guest,
    GuestCapture,
    GuestError,
    GuestSpec,
    HostTools,
    LabSetupError,
    MigrationStats,
    QmpClient,
    QmpCommandError,
    QmpError,
    QmpTimeoutError,
    SerialConsole,
    build_initramfs,
    capture_guests,
    default_specs,
    find_kernel,
    init_script,
)
from tmdht.lab.errors import UsageError
from tmdht.lab.host import find_busybox
from tmdht.lab.initramfs import (
    DISTRIBUTION_BUDGET,
    DISTRIBUTION_DIR,
    distribution_files,
    ensure_initramfs,
    server_init_script,
)

# -- initramfs ---------------------------------------------------------------------------------


def test_initramfs_is_deterministic(lab_tools: HostTools) -> None:
    first = build_initramfs(lab_tools.busybox, lab_tools.cpio)
    second = build_initramfs(lab_tools.busybox, lab_tools.cpio)
    assert first == second
    archive = gzip.decompress(first)
    assert archive.startswith(b"070701")  # newc
    for member in (b"init\0", b"bin/busybox\0", b"TRAILER!!!\0"):
        assert member in archive
    assert init_script().encode() in archive
    assert lab_tools.busybox.read_bytes() in archive


def test_init_script_runs_every_workload() -> None:
    script = init_script()
    assert script.startswith("#!/bin/busybox sh\n")
    for workload in WORKLOADS:
        assert f"workload_{workload}() {{" in script
    assert "tmdht-counter" in script


# -- specs and host tools ----------------------------------------------------------------------


def test_guest_spec_builds_the_kernel_command_line() -> None:
    spec = GuestSpec(name="a", workload="files", seed=3)
    assert spec.kernel_cmdline() == (
        "console=ttyS0 quiet panic=-1 tmdht.workload=files tmdht.seed=3"
    )
    assert spec.ram_bytes == 128 << 20
    no_kaslr = GuestSpec(name="b", workload="idle", seed=0, memory_mib=256, kaslr=False)
    assert no_kaslr.kernel_cmdline().endswith(" nokaslr")
    assert no_kaslr.ram_bytes == 256 << 20


def test_server_spec_boots_its_own_init_and_keeps_old_capture_keys() -> None:
    spec = GuestSpec(name="s", workload="server", seed=7, memory_mib=1024, dirty_mib_s=50)
    assert spec.server
    assert spec.kernel_cmdline() == ("console=ttyS0 quiet panic=-1 tmdht.workload=server "
                                     "tmdht.seed=7 rdinit=/init-server tmdht.dirty=50")
    assert spec.cache_inputs()["dirty_mib_s"] == 50
    # A field added later must not change the keys of the guests cached before it existed.
    plain = GuestSpec(name="a", workload="files", seed=3)
    assert plain.cache_inputs() == {"name": "a", "workload": "files", "seed": 3,
                                    "memory_mib": 128, "kaslr": True}
    assert "dirty_mib_s" not in GuestSpec(name="s", workload="server", seed=1).cache_inputs()


def test_server_initramfs_adds_its_init_and_the_distribution(lab_tools: HostTools) -> None:
    plain = build_initramfs(lab_tools.busybox, lab_tools.cpio)
    server = gzip.decompress(build_initramfs(lab_tools.busybox, lab_tools.cpio, server=True))
    assert server_init_script().encode() in server
    assert server_init_script().startswith("#!/bin/busybox sh\n")
    files = distribution_files()
    assert files, "no distribution candidate exists on this host"
    assert sum(f.stat().st_size for f in files) <= DISTRIBUTION_BUDGET
    for path in files:
        assert f"{DISTRIBUTION_DIR}/{path.name}\0".encode() in server
    assert gzip.decompress(plain) != server
    assert b"init-server" not in gzip.decompress(plain)  # the default archive is unchanged


def test_distribution_skips_missing_files_and_stops_at_the_budget(tmp_path: Path) -> None:
    for name, size in (("a", 10), ("b", 20), ("c", 5)):
        (tmp_path / name).write_bytes(b"x" * size)
    names = tuple(str(tmp_path / n) for n in ("a", "missing", "b", "c"))
    assert distribution_files(names, budget=35) == [tmp_path / "a", tmp_path / "b",
                                                     tmp_path / "c"]
    assert distribution_files(names, budget=29) == [tmp_path / "a"]


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "has space"},
        {"name": ""},
        {"workload": "bitcoin"},
        {"seed": -1},
        {"seed": True},
        {"memory_mib": 16},
        {"kaslr": "yes"},
        {"dirty_mib_s": 5},
        {"workload": "server", "dirty_mib_s": -1},
        {"workload": "server", "dirty_mib_s": 1.5},
    ],
)
def test_guest_spec_rejects_bad_values(changes: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"name": "ok", "workload": "idle", "seed": 1, **changes}
    with pytest.raises(UsageError):
        GuestSpec(**arguments)


def test_missing_kernel_names_the_apt_packages(tmp_path: Path) -> None:
    with pytest.raises(LabSetupError) as caught:
        find_kernel(str(tmp_path / "vmlinuz-*-cloud-amd64"))
    message = str(caught.value)
    assert "apt-get install" in message
    for package in APT_PACKAGES:
        assert package in message


def test_dynamic_busybox_is_rejected() -> None:
    with pytest.raises(LabSetupError, match="busybox-static"):
        find_busybox(Path(os.path.realpath(sys.executable)))


# -- QMP client and console, against in-memory peers -------------------------------------------


def _send(sock: socket.socket, *messages: dict[str, object]) -> None:
    sock.sendall(b"".join(json.dumps(m).encode() + b"\r\n" for m in messages))


def test_qmp_client_commands_errors_and_events() -> None:
    ours, qemu = socket.socketpair()
    with qemu:
        _send(
            qemu,
            {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}},
            {"return": {}, "id": 1},
            {"event": "STOP", "data": {}, "timestamp": {"seconds": 5, "microseconds": 0}},
            {
                "error": {
                    "class": "CommandNotFound",
                    "desc": "The command nope has not been found",
                },
                "id": 2,
            },
        )
        with QmpClient(ours, timeout=5) as client:
            assert client.greeting["version"]["qemu"]["major"] == 7
            with pytest.raises(QmpCommandError) as caught:
                client.execute("nope")
            assert isinstance(caught.value, QmpError)
            assert caught.value.error_class == "CommandNotFound"
            assert "has not been found" in str(caught.value)
            assert client.wait_event("STOP", timeout=1).timestamp == 5.0

            started = time.monotonic()
            with pytest.raises(QmpTimeoutError):
                client.execute("slow", timeout=0.2)
            assert time.monotonic() - started < 2
            # The late answer to id 3 is skipped; id 4 gets its own.
            _send(
                qemu,
                {"return": "late", "id": 3},
                {"event": "MIGRATION", "data": {"status": "completed"}},
                {"return": 42, "id": 4},
            )
            assert client.execute("fast", timeout=5) == 42
            event = client.wait_event(
                "MIGRATION", timeout=1, predicate=lambda e: e.data["status"] == "completed"
            )
            assert event.data == {"status": "completed"}
            with pytest.raises(QmpTimeoutError):
                client.wait_event("MIGRATION", timeout=0.1)
        qemu.shutdown(socket.SHUT_WR)


def test_qmp_closed_connection_is_a_qmp_error() -> None:
    ours, qemu = socket.socketpair()
    with qemu:
        _send(qemu, {"QMP": {"version": {}, "capabilities": []}}, {"return": {}, "id": 1})
        with QmpClient(ours, timeout=5) as client:
            qemu.close()
            with pytest.raises(QmpError):
                client.execute("query-status", timeout=5)


def test_qmp_connect_gives_up_in_time(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(QmpTimeoutError):
        QmpClient.connect(tmp_path / "nobody.sock", timeout=0.3)
    assert time.monotonic() - started < 2


def test_serial_console_tracks_counter_lines() -> None:
    ours, guest = socket.socketpair()
    with guest:
        console = SerialConsole(ours)
        try:
            guest.sendall(
                b"noise\r\ntmdht-ready workload=idle seed=1\r\ntmdht-counter 1\r\ntmdht-coun"
            )
            console.pump(1.0)
            assert (console.counter, console.first_counter) == (1, 1)
            assert console.ready_line == "tmdht-ready workload=idle seed=1"
            guest.sendall(b"ter 2\r\n")
            console.pump(1.0)
            assert console.counter == 2
            assert console.pump(0.0) == 0
            guest.close()
            console.pump(1.0)
            assert console.eof
            assert "tmdht-counter 2" in console.tail()
        finally:
            console.close()


# -- guests under QEMU -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def running_guest(lab_tools: HostTools, lab_initramfs: Path) -> Iterator[Guest]:
    """An idle guest that printed its first counter line."""
    with Guest(
        GuestSpec(name="probe", workload="idle", seed=7), tools=lab_tools, initramfs=lab_initramfs
    ) as guest:
        guest.wait_counter(0, timeout=60)
        yield guest


def test_guest_boots_and_counter_advances(running_guest: Guest) -> None:
    first = running_guest.wait_counter(0, timeout=5)
    later = running_guest.wait_counter(first + 2, timeout=30)
    assert later >= first + 2
    assert running_guest.counter == running_guest.console.counter
    assert running_guest.status() == "running"
    assert running_guest.console.ready_line == "tmdht-ready workload=idle seed=7"


def test_qmp_error_surfaces_as_qmp_error(running_guest: Guest) -> None:
    with pytest.raises(QmpError) as caught:
        running_guest.qmp.execute("no-such-command")
    assert isinstance(caught.value, QmpCommandError)
    assert caught.value.error_class == "CommandNotFound"
    with pytest.raises(QmpCommandError, match="incoming"):
        running_guest.migrate_incoming(f"unix:{running_guest.socket_path('nope')}")
    assert running_guest.status() == "running"


def test_elf_dump_of_a_running_guest(running_guest: Guest, tmp_path: Path) -> None:
    path = running_guest.dump_elf(tmp_path / "core.elf")
    with path.open("rb") as core:
        assert core.read(4) == b"\x7fELF"
    assert path.stat().st_size > running_guest.spec.ram_bytes
    assert running_guest.status() == "running"


def test_guest_is_killed_and_reaped_when_the_block_raises(
    lab_tools: HostTools, lab_initramfs: Path
) -> None:
    guest = Guest(
        GuestSpec(name="doomed", workload="idle", seed=1), tools=lab_tools, initramfs=lab_initramfs
    )
    with pytest.raises(RuntimeError, match="boom"), guest:
        pid = guest.pid
        workdir = guest.workdir
        assert guest.returncode is None
        raise RuntimeError("boom")
    assert guest.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # signal 0 only probes; a zombie would still be found
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert not workdir.exists()


def test_qemu_start_failure_is_a_guest_error(lab_tools: HostTools, lab_initramfs: Path) -> None:
    guest = Guest(
        GuestSpec(name="broken", workload="idle", seed=1),
        tools=lab_tools,
        initramfs=lab_initramfs,
        extra_args=("-no-such-option",),
    )
    with pytest.raises(GuestError, match="no-such-option"):
        guest.start()
    assert guest.returncode is not None


def test_guest_accepts_a_relative_initramfs_path(
    lab_tools: HostTools, lab_initramfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(lab_initramfs.parent)
    spec = GuestSpec(name="relative", workload="idle", seed=1)
    with Guest(spec, tools=lab_tools, initramfs=Path(lab_initramfs.name)) as guest:
        assert guest.status() == "running"
    with pytest.raises(UsageError, match="does not exist"):
        Guest(spec, tools=lab_tools, initramfs=Path("missing.cpio.gz")).start()


def test_server_guest_fills_memory_and_dirties_at_its_pace(lab_tools: HostTools,
                                                          build_dir: Path) -> None:
    initramfs = ensure_initramfs(build_dir / "lab", lab_tools.busybox, lab_tools.cpio,
                                 server=True)
    spec = GuestSpec(name="server-test", workload="server", seed=5, dirty_mib_s=8)
    with Guest(spec, tools=lab_tools, initramfs=initramfs) as guest:
        guest.wait_counter(12, timeout=180)
        ready = guest.console.ready_line
        assert ready is not None and "workload=server" in ready and "dirty=8" in ready
        fields = dict(word.split("=", 1) for word in ready.split()[1:])
        assert int(fields["filled_mib"]) >= int(fields["available_mib"]) // 2
        progress = [(int(m), int(t)) for m, t in
                    re.findall(r"tmdht-dirtied mib=(\d+) cs=(\d+)", guest.console.transcript)]
        assert len(progress) >= 2, guest.console.tail()
        (mib0, cs0), (mib1, cs1) = progress[0], progress[-1]
        assert (mib1 - mib0) / ((cs1 - cs0) / 100) > 8 * 0.6  # TCG on a busy host: roughly


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_live_migration_between_two_qemus(
    lab_tools: HostTools, lab_initramfs: Path, transport: str
) -> None:
    spec = GuestSpec(name="traveller", workload="mixed", seed=11)
    with (
        Guest(spec, tools=lab_tools, initramfs=lab_initramfs) as source,
        Guest(spec, incoming="defer", tools=lab_tools, initramfs=lab_initramfs) as dest,
    ):
        assert dest.status() == "inmigrate"
        source.wait_counter(2, timeout=60)
        if transport == "unix":
            uri = f"unix:{dest.socket_path('migration')}"
            dest.migrate_incoming(uri)
        else:  # port 0: QEMU picks a free port and reports it
            dest.migrate_incoming("tcp:127.0.0.1:0")
            uri = f"tcp:127.0.0.1:{dest.incoming_tcp_port()}"
        source.set_migration_parameters(max_bandwidth=1 << 30, downtime_limit=300)
        assert source.migration_parameters()["max-bandwidth"] == 1 << 30
        source.migrate(uri)
        stats = source.wait_migration(timeout=60)
        assert isinstance(stats, MigrationStats)
        assert stats.status == "completed"
        assert stats.transferred_bytes is not None and stats.transferred_bytes > 16 << 20
        # QEMU reports "completed" before it computes these (finish-migrate -> postmigrate):
        # wait_migration returns them computed, not zero.
        assert stats.total_time_ms and stats.downtime_ms
        assert 0 < stats.downtime_ms <= stats.total_time_ms
        assert source.status() == "postmigrate"
        last = source.counter
        assert last is not None and last >= 2
        assert dest.wait_migration(timeout=30).status == "completed"
        resumed = dest.wait_counter(last + 2, timeout=30)
        assert resumed >= last + 2
        # The destination continues the source's counter: its memory came along.
        assert dest.console.first_counter is not None
        assert last < dest.console.first_counter <= last + 3
        assert dest.status() == "running"


# -- captures ----------------------------------------------------------------------------------


def test_capture_default_guests(guest_captures: list[GuestCapture], build_dir: Path) -> None:
    specs = default_specs()
    assert [c.spec for c in guest_captures] == list(specs)
    assert len({c.key for c in guest_captures}) == len(specs)
    assert len({s.workload for s in specs}) >= 4
    assert any(not s.kaslr for s in specs)
    for capture in guest_captures:
        assert capture.directory.parent == build_dir.resolve() / "guests"
        with capture.stream_path.open("rb") as stream:
            assert struct.unpack(">4sI", stream.read(8)) == (b"QEVM", 3)
        assert capture.dump_path.stat().st_size == capture.spec.memory_mib << 20
        assert capture.ram_bytes == capture.spec.ram_bytes
        metadata = capture.metadata()
        assert metadata["migration"]["status"] == "completed"
        assert metadata["sizes"]["stream"] == capture.stream_path.stat().st_size
        assert metadata["counter_at_capture"] >= 4


def test_capture_cache_hit_does_not_boot(
    guest_captures: list[GuestCapture], build_dir: Path, lab_tools: HostTools
) -> None:
    def no_boot(spec: GuestSpec, **_kwargs: object) -> Guest:
        raise AssertionError(f"cache miss: would boot {spec.name}")

    files = [p for c in guest_captures for p in (c.stream_path, c.dump_path, c.metadata_path)]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = capture_guests(build_dir, default_specs(), tools=lab_tools, guest_factory=no_boot)
    assert again == guest_captures
    assert {p: p.stat().st_mtime_ns for p in files} == before


class _FailingGuest:
    """Writes half a stream, then fails the way a crashed QEMU does."""

    def __init__(self, spec: GuestSpec, **_kwargs: object) -> None:
        self.spec = spec

    def __enter__(self) -> _FailingGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def wait_counter(self, min_value: int, timeout: float) -> int:
        return min_value

    def migrate_to_file(self, path: Path, *, timeout: float = 0.0) -> MigrationStats:
        path.write_bytes(b"QEVM\0\0\0\3half")
        raise GuestError("QEMU exited during migration")

    def pmemsave(self, path: Path, *, size: int | None = None, timeout: float = 0.0) -> Path:
        raise AssertionError("not reached")

    def dump_elf(self, path: Path, *, timeout: float = 0.0) -> Path:
        raise AssertionError("not reached")


def test_failed_capture_leaves_nothing_that_looks_valid(
    tmp_path: Path, lab_tools: HostTools
) -> None:
    specs = [GuestSpec(name="half", workload="idle", seed=1)]
    with pytest.raises(CaptureError, match="half"):
        capture_guests(tmp_path, specs, tools=lab_tools, guest_factory=_FailingGuest)
    assert list((tmp_path / "guests").iterdir()) == []


def test_stream_and_dump_show_the_same_memory(guest_captures: list[GuestCapture]) -> None:
    # The raw dump reads guest-physical addresses: in the legacy VGA window 0xA0000-0xBFFFF
    # (pages 160-191) it sees the VGA device, not pc.ram. Everything else must match the stream.
    vga_window = range(0xA0000 // 4096, 0xC0000 // 4096)
    capture = next(c for c in guest_captures if c.spec.workload == "files")
    with open_image(capture.stream_path) as stream, open_image(capture.dump_path) as dump:
        assert stream.blocks[0].name == "pc.ram"
        assert stream.blocks[0].length == dump.size == capture.ram_bytes
        # zip stops at the dump's end: the stream's later blocks (VGA RAM, ROMs) are not in it.
        differing = {
            index
            for index, (ours, theirs) in enumerate(
                zip(stream.iter_pages(), dump.iter_pages(), strict=False)
            )
            if ours != theirs
        }
    assert differing <= set(vga_window)


def test_partial_captures_of_dead_processes_are_removed(
    tmp_path: Path, lab_tools: HostTools
) -> None:
    guests = tmp_path / "guests"
    dead = guests / ".partial-idle-1-0123456789abcdef-999999999-x1y2"  # beyond any pid_max
    ours = guests / f".partial-idle-1-0123456789abcdef-{os.getpid()}-x1y2"
    for directory in (dead, ours):
        directory.mkdir(parents=True)
        (directory / "stream.bin").write_bytes(b"QEVM")
    assert capture_guests(tmp_path, [], tools=lab_tools) == []
    assert not dead.exists()
    assert ours.exists()
