"""The deploy test: deploy/ run by its real engines (scripts/deploy-test.sh runs this as root).

    PYTHONPATH=tests build/venv/bin/python -m deploy_engines [--only docker|systemd]

1. Record the host's state; make (or take from the cache) the two debootstrapped bases, in
   parallel.
2. Docker: dockerd with private roots; the base imported; the classic builder's context; the
   shipped Dockerfile built; three containers with the StatefulSet's pod settings: ready,
   hardened, a cluster, pages published and resolved from the host, a restart that keeps id and
   pages; the shipped compose.yaml up; Debian's Prometheus scraping it with the alert rules
   quiet.
3. systemd: the project in a bookworm rootfs booted by systemd-nspawn --private-network; three
   Type=notify instances; one user each; restart, kill -9, a missing key; security exposure.
4. Teardown, always: everything stopped by PID and removed; the host's state compared with the
   record (a difference of ours fails the test).

Prints a summary and ``deploy: N passed, M failed``; exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from deploy_engines.bases import Bases
from deploy_engines.docker import BRIDGE, DockerPhase
from deploy_engines.host import (
    HostState,
    cleanup_created,
    current_links,
    hold_host_lock,
    run,
    stop_leftovers,
)
from deploy_engines.report import CheckFailed, Report, Skipped
from deploy_engines.systemd import SystemdPhase

REPO = Path(__file__).resolve().parents[2]
BUDGET = 600.0
LOCK_WAIT = 1800.0
"""Seconds to wait for another deploy test on this host to finish."""
"""Seconds the whole test should take with cached bases (reported, not enforced)."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="deploy_engines", description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["docker", "systemd"], help="run one half")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the deploy test runs dockerd and systemd-nspawn: run it as root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    report = Report()
    try:
        hold_host_lock(LOCK_WAIT, report.say)
    except TimeoutError as exc:
        print(f"deploy test: {exc}", file=sys.stderr)
        return 1
    work = REPO / "build" / "deploy-test"
    cache = Path(os.environ.get("TMDHT_DEPLOY_CACHE", REPO / "build" / "deploy-cache"))
    leftovers = stop_leftovers(work)
    if BRIDGE in current_links():
        # Held lock: no other deploy test runs, so the bridge is a dead run's (its dockerd gone
        # before `docker network rm`); left, it would change the host's routes under this run.
        run(["ip", "link", "del", BRIDGE], check=False)
        leftovers.append(f"link {BRIDGE}")
    if leftovers:
        report.say(f"an earlier run was killed before its teardown; stopped {leftovers}")
    if work.exists():
        run(["rm", "-rf", "--one-file-system", work], timeout=300)
    (work / "logs").mkdir(parents=True)
    report.say(f"work directory {work}, logs in {work / 'logs'}, bases cached in {cache}")
    before = HostState.record(work)
    report.say(f"host before: {before.counts()}")
    docker = DockerPhase(REPO, work, report) if args.only != "systemd" else None
    systemd = SystemdPhase(REPO, work, report) if args.only != "docker" else None
    try:
        bases = Bases(cache, REPO, work / "logs" / "bases.log")
        docker_tar = systemd_root = None
        with (
            report.phase("bases"),
            report.step("bases: debootstrapped bookworm, made or cached") as notes,
            concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="debootstrap") as pool,
        ):
            docker_job = pool.submit(bases.ensure_docker) if docker else None
            systemd_job = pool.submit(bases.ensure_systemd) if systemd else None
            if docker_job is not None:
                docker_tar, how = docker_job.result()
                notes.append(how)
            if systemd_job is not None:
                systemd_root, how = systemd_job.result()
                notes.append(how)
        if docker is not None and docker_tar is not None:
            run_docker(docker, docker_tar, report)
        if systemd is not None and systemd_root is not None:
            run_systemd(systemd, systemd_root, report)
    finally:
        teardown(report, before, work, docker, systemd)
    print(report.summary(), flush=True)
    if report.elapsed() > BUDGET:
        print(f"note: took {report.elapsed():.0f} s, over the {BUDGET:.0f} s budget")
    return 1 if report.failed else 0


def run_docker(docker: DockerPhase, tar: Path, report: Report) -> None:
    """The Docker half; a failed step ends it."""
    with report.phase("docker"):
        with report.step("docker: dockerd 20.10 with private roots, no iptables, no bridge"):
            docker.start_dockerd()
        with report.step("docker: debootstrapped base imported (host CAs trusted)") as notes:
            notes.append(docker.import_base(tar))
        with report.step(
            "docker: classic builder sends only what .dockerignore lets through"
        ) as notes:
            notes.append(docker.check_context())
        with report.step("docker: shipped Dockerfile built, packages as locked") as notes:
            notes.append(docker.build_image())
        with report.step("docker: 3 containers with the StatefulSet's pod settings ready") as notes:
            started = report.elapsed()
            names = docker.run_trio()
            docker.wait_ready(names, 35.0)
            notes.append(f"ready {report.elapsed() - started:.1f} s after the first docker run")
        with report.step("docker: settings applied to the node processes") as notes:
            notes.append(docker.check_hardening(names))
        seed = docker.ip_of(names[0])
        key_file = docker.work / "k8s" / "secret" / "cluster.key"
        with report.step("docker: cluster status --json shows 3 ready members") as notes:
            members = docker.status(seed, key_file)
            notes.append(", ".join(m["node_id"][:8] for m in members))
        with report.step("docker: pages published and resolved from the host") as notes:
            pages, note = docker.publish_and_resolve(seed)
            notes.append(note)
        with report.step("docker: a stopped and started container keeps its id and pages") as notes:
            notes.append(docker.restart_keeps_identity(names[1], seed, pages))
        with report.step("docker: limits and socket buffers below the asked are warned") as notes:
            notes.append(docker.check_logs(names))
        with report.step("docker: sweeps with nothing to do stay out of the info log") as notes:
            notes.append(docker.check_quiet_sweeps([names[0], names[2]]))  # [1] restarted
        docker.remove_trio(names)
        with report.step(
            "compose: docker-compose up of the shipped compose.yaml, 3 ready"
        ) as notes:
            started = report.elapsed()
            compose_names, _ = docker.compose_up()
            docker.wait_ready(compose_names, 35.0)
            members = docker.status(docker.ip_of(compose_names[0]), docker.compose_key or Path())
            notes.append(
                f"{len(members)} members ready {report.elapsed() - started:.1f} s after up"
            )
        with report.step("compose: Debian's prometheus scrapes it, alert rules quiet") as notes:
            notes.append(docker.prometheus_quiet(compose_names))


def run_systemd(systemd: SystemdPhase, base: Path, report: Report) -> None:
    """The systemd half; a failed step ends it."""
    steps: list[tuple[str, Callable[[], str]]] = [
        ("rootfs with the project, unit, drop-in, 3 configs", lambda: systemd.prepare(base)),
        ("booted by systemd-nspawn --private-network", systemd.boot),
        ("3 Type=notify instances ready when start returns", systemd.start_instances),
        ("one user per instance, hardening applied", systemd.check_users),
        ("cluster status shows 3 ready members", systemd.check_ring),
        ("restart keeps the node id", systemd.restart_keeps_id),
        ("kill -9 is restarted", systemd.kill_restarts),
        ("reload re-reads /etc/tmdht/cluster.key", systemd.reload_rereads_the_key),
        ("missing key fails with the credential error", systemd.missing_key_fails),
        ("systemd-analyze security <= 2.0", systemd.security),
        ("clamped LimitNOFILE warned, idle sweeps quiet", systemd.check_journal),
    ]
    with report.phase("systemd"):
        for name, check in steps:
            with report.step(f"systemd: {name}") as notes:
                notes.append(check())


def teardown(
    report: Report,
    before: HostState,
    work: Path,
    docker: DockerPhase | None,
    systemd: SystemdPhase | None,
) -> None:
    """Stop and remove everything, then compare the host with the record."""
    with report.phase("teardown"), report.step("teardown: host left as it was found") as notes:
        leftovers: list[str] = []
        for part in (docker, systemd):
            if part is not None:
                try:
                    leftovers += part.teardown()
                except (OSError, RuntimeError) as exc:  # go on with the rest of the teardown
                    leftovers.append(f"{type(part).__name__} teardown: {exc}")
                report.say(f"{type(part).__name__} stopped")
        removed = cleanup_created(before, work)
        # Everything but the logs: dockerd's data root, the container's tree, the pod files.
        doomed = [child for child in work.iterdir() if child.name != "logs"]
        if doomed:
            run(["rm", "-rf", "--one-file-system", *doomed], timeout=300, check=False)
        report.say(f"removed {', '.join(c.name for c in doomed)} from {work}")
        after = HostState.record(work)
        diff = before.diff(after, work)
        if diff.foreign:
            report.say(f"changed by others meanwhile (not ours): {diff.foreign}")
        if removed:
            notes.append(f"cleaned up {len(removed)} daemon leftovers")
        notes.append(f"host after: {after.counts()}")
        if leftovers or diff.ours:
            raise CheckFailed(f"left behind: {leftovers + diff.ours}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Skipped:
        sys.exit(1)
