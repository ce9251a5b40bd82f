"""The host the deploy test runs on: commands, the processes it starts, and the state it must
leave as it found it (recorded before, compared after).

Everything the test creates is named ``tmdht-deploy...`` or lives under its work directory; the
daemons it starts (dockerd with private roots, systemd-nspawn, prometheus) are stopped by the PID
it started them with. Other users of a shared machine may change the same host state meanwhile
(their own namespaces, bridges, nft tables): a difference is blamed on this test only when it
looks like what this test or the daemons it started create; the rest is reported as foreign.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

__all__ = [
    "RUN_DIR",
    "WATCHED_PATHS",
    "Daemon",
    "HostState",
    "StateDiff",
    "cleanup_created",
    "run",
    "stop_leftovers",
    "wait_for",
]

# Places dockerd, containerd and systemd-nspawn write to outside the work directory. The test
# points dockerd's roots and trust key into the work directory, so only their runtime leftovers
# land here; each is removed at the end if it did not exist before.
RUN_DIR = Path("/run/tmdht-deploy")
"""Where the test's dockerd keeps its runtime files (short paths: unix sockets live there)."""
WATCHED_PATHS = (
    RUN_DIR,
    Path("/etc/docker"),
    Path("/run/docker"),
    Path("/run/containerd"),
    Path("/run/systemd/nspawn"),
    Path("/var/lib/docker"),
    Path("/var/lib/containerd"),
    Path("/var/lib/machines"),
    Path("/root/.docker"),
)
# Control groups dockerd (docker/<id>) and systemd-nspawn without a host systemd (payload/,
# supervisor/) create at the top of each hierarchy.
OUR_CGROUPS = re.compile(r"^(docker|payload|supervisor|tmdht-deploy)(/|$)")
OUR_LINKS = re.compile(r"^(tmdht-deploy|docker|br-|veth)")
OUR_NFT_TABLES = re.compile(r"(docker|^ip6? (filter|nat|raw|mangle)$|tmdht-deploy)")
OUR_MOUNTS = re.compile(rf"^{re.escape(str(RUN_DIR))}/|docker|containerd|nspawn")
CGROUP_ROOT = Path("/sys/fs/cgroup")
T = TypeVar("T")


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float = 120,
    check: bool = True,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
    log: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (bounded by ``timeout``), capturing its output.

    ``log``: append the command line and its output there. A non-zero exit raises
    RuntimeError with the tail of the output when ``check``.
    """
    args = [str(a) for a in argv]
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input_text,
        stdin=None if input_text is not None else subprocess.DEVNULL,
        check=False,
        cwd=cwd,
    )
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}[exit {proc.returncode}]\n")
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(args[:4])} ... exited {proc.returncode}:\n{tail}")
    return proc


@dataclass
class Daemon:
    """A background process this test started; stopped by its PID, never by name."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, argv: Sequence[str | Path], log: Path, **kw: object) -> Daemon:
        """Start ``argv`` with stdout and stderr appended to ``log`` and no stdin."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,  # type: ignore[arg-type]
            )
        return cls(name, proc, log)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def running(self) -> bool:
        """Whether it has not exited."""
        return self.proc.poll() is None

    def stop(self, grace: float = 30.0, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` to the process, wait ``grace`` seconds, then SIGKILL it; its exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def tail(self, lines: int = 20) -> str:
        """The end of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _lines(argv: Sequence[str]) -> list[str]:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL
        )
    except OSError:
        return []
    return proc.stdout.splitlines() if proc.returncode == 0 else []


def current_links() -> set[str]:
    """The names of the network links in this namespace."""
    out = _lines(["ip", "-j", "link", "show"])
    return {link["ifname"] for link in json.loads(out[0])} if out else set()


def _routes() -> set[str]:
    return {line.strip() for line in _lines(["ip", "route", "show"])}


def _nft_tables() -> set[str]:
    return {line.removeprefix("table ").strip() for line in _lines(["nft", "list", "tables"])}


def _mounts() -> set[str]:
    points = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        points.add(fields[4].replace("\\040", " "))
    return points


def _cgroups() -> set[str]:
    """``hierarchy:path`` of the control groups two levels deep (the sandbox's own left out)."""
    found = set()
    if not CGROUP_ROOT.is_dir():
        return found
    for hierarchy in sorted(CGROUP_ROOT.iterdir()):
        if not hierarchy.is_dir():
            continue
        with contextlib.suppress(OSError):
            for top in hierarchy.iterdir():
                if not top.is_dir() or top.name == "process_api":
                    continue
                found.add(f"{hierarchy.name}:{top.name}")
                with contextlib.suppress(OSError):
                    found.update(
                        f"{hierarchy.name}:{top.name}/{sub.name}"
                        for sub in top.iterdir()
                        if sub.is_dir()
                    )
    return found


def _paths() -> set[str]:
    found = set()
    for root in WATCHED_PATHS:
        if root.exists() or root.is_symlink():
            found.add(str(root))
            if root.is_dir():
                with contextlib.suppress(OSError):
                    found.update(str(p) for p in root.rglob("*"))
    return found


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return "?"


def _our_processes(marker: str) -> set[str]:
    """Processes whose command line names ``marker`` (the work directory): our daemons."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker in cmdline:
                found.add(f"{proc.name} {cmdline[:120].strip()}")
    return found


@dataclass(frozen=True)
class StateDiff:
    """What changed between two records of the host state."""

    ours: list[str]
    """Changes of the kinds this test or its daemons make: each one fails the test."""
    foreign: list[str]
    """Other changes (other users of the machine): reported, not blamed on this test."""


@dataclass(frozen=True)
class HostState:
    """What the test must leave as it found it."""

    links: frozenset[str] = field(default_factory=frozenset)
    routes: frozenset[str] = field(default_factory=frozenset)
    nft_tables: frozenset[str] = field(default_factory=frozenset)
    mounts: frozenset[str] = field(default_factory=frozenset)
    cgroups: frozenset[str] = field(default_factory=frozenset)
    paths: frozenset[str] = field(default_factory=frozenset)
    sysctls: tuple[tuple[str, str], ...] = ()
    processes: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def record(cls, work: Path) -> HostState:
        """The state now; ``work`` is the test's work directory (its daemons name it)."""
        return cls(
            links=frozenset(current_links()),
            routes=frozenset(_routes()),
            nft_tables=frozenset(_nft_tables()),
            mounts=frozenset(_mounts()),
            cgroups=frozenset(_cgroups()),
            paths=frozenset(_paths()),
            sysctls=tuple(
                (n, _sysctl(n)) for n in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")
            ),
            processes=frozenset(_our_processes(str(work))),
        )

    def counts(self) -> str:
        """A one-line description, for the log."""
        sysctls = ", ".join(f"{n}={v}" for n, v in self.sysctls)
        return (
            f"{len(self.links)} links, {len(self.routes)} routes, {len(self.nft_tables)} nft "
            f"tables, {len(self.mounts)} mounts, {len(self.cgroups)} cgroups, {sysctls}"
        )

    def diff(self, after: HostState, work: Path) -> StateDiff:
        """Changes from this state to ``after``, split into ours and foreign."""
        ours: list[str] = []
        foreign: list[str] = []

        def compare(
            kind: str, before: Iterable[str], now: Iterable[str], mine: Callable[[str], bool]
        ) -> None:
            b, a = set(before), set(now)
            changes = [*((x, "+") for x in sorted(a - b)), *((x, "-") for x in sorted(b - a))]
            for item, sign in changes:
                (ours if mine(item) else foreign).append(f"{kind} {sign}{item}")

        def anything(_: str) -> bool:
            return True

        compare("link", self.links, after.links, lambda n: bool(OUR_LINKS.match(n)))
        compare(
            "route",
            self.routes,
            after.routes,
            lambda r: bool(re.search(r"dev (tmdht-deploy|docker|br-)", r)),
        )
        compare(
            "nft table", self.nft_tables, after.nft_tables, lambda t: bool(OUR_NFT_TABLES.search(t))
        )
        compare(
            "mount",
            self.mounts,
            after.mounts,
            lambda m: m.startswith(f"{work}/") or bool(OUR_MOUNTS.search(m)),
        )
        compare(
            "cgroup",
            self.cgroups,
            after.cgroups,
            lambda c: bool(OUR_CGROUPS.match(c.partition(":")[2])),
        )
        compare("path", self.paths, after.paths, anything)
        compare("process", self.processes, after.processes, anything)
        for (name, before), (_, now) in zip(self.sysctls, after.sysctls, strict=True):
            if before != now:
                # dockerd would set it (--ip-forward), so a change counts as ours.
                ours.append(f"sysctl {name}: {before} -> {now}")
        return StateDiff(ours, foreign)


def cleanup_created(before: HostState, work: Path) -> list[str]:
    """Undo what this test's daemons leave behind that ``before`` did not have: mounts under the
    work directory, their control groups, their runtime paths. Returns what was removed."""
    removed = []
    now = HostState.record(work)
    for point in sorted(now.mounts - before.mounts, key=len, reverse=True):
        ours = point.startswith(f"{work}/") or OUR_MOUNTS.search(point)
        if ours and run(["umount", "--lazy", point], check=False).returncode == 0:
            removed.append(f"mount {point}")
    for entry in sorted(now.cgroups - before.cgroups, key=len, reverse=True):
        hierarchy, _, path = entry.partition(":")
        if not OUR_CGROUPS.match(path):
            continue
        directory = CGROUP_ROOT / hierarchy / path
        for sub in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir():
                with contextlib.suppress(OSError):
                    sub.rmdir()
        with contextlib.suppress(OSError):
            directory.rmdir()
            removed.append(f"cgroup {entry}")
    for path in sorted(now.paths - before.paths, key=len, reverse=True):
        target = Path(path)
        with contextlib.suppress(OSError):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
            removed.append(f"path {path}")
    return removed


def stop_leftovers(work: Path) -> list[str]:
    """Stop the daemons an earlier run of this test left running (it was killed before its
    teardown): dockerd, systemd-nspawn or prometheus whose command line names this test's work
    or runtime directory, so none but ours. Then unmount and remove what they held."""
    stopped = []
    markers = (str(work), str(RUN_DIR))
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            comm = (proc / "comm").read_text().strip()
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if comm in ("dockerd", "systemd-nspawn", "prometheus") and any(
                m in cmdline for m in markers
            ):
                os.kill(int(proc.name), signal.SIGTERM)
                stopped.append(f"{comm} {proc.name}")
    for entry in stopped:
        pid = int(entry.split()[1])
        with contextlib.suppress(TimeoutError):
            wait_for(f"{entry} to exit", lambda p=pid: not Path(f"/proc/{p}").exists(), 60)
    mounts = [m for m in _mounts() if any(m.startswith(f"{marker}/") for marker in markers)]
    for point in sorted(mounts, key=len, reverse=True):
        run(["umount", "--lazy", point], check=False)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    return stopped + [f"mount {m}" for m in mounts]


HOST_LOCK = Path("/run/lock/tmdht-deploy-test.lock")
"""One deploy test per host: its bridge, address pool and nspawn machine names are host-wide, so
a second run (from another checkout) waits for the first instead of recording its links as the
host's state."""


def hold_host_lock(timeout: float, say: Callable[[str], None]) -> int:
    """Take the host-wide deploy-test lock (``flock``, released when this process exits, however
    it exits); wait for another run to finish, bounded by ``timeout``. Returns the lock's fd."""
    HOST_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(HOST_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        say(f"another deploy test (pid {holder}) is running on this host; waiting for it")
        deadline = time.monotonic() + timeout
        while True:  # bounded by the deadline; flock has no timeout of its own
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(
                        f"another deploy test (pid {holder}) held {HOST_LOCK} for {timeout:.0f} s"
                    ) from None
                time.sleep(1.0)  # polling another process's lock; no event to wait on
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.25) -> T:
    """Poll ``check()`` (another process's state) until it returns a true value; bounded by
    count and time. Raises TimeoutError naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: object = None
    for _ in range(int(timeout / interval) + 2):
        try:
            result = check()
        except (OSError, RuntimeError, ValueError) as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)  # polling another process, not synchronising threads
    raise TimeoutError(f"{what}: not within {timeout:.0f} s (last: {last!r})")
