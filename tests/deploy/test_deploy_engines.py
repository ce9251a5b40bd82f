"""The deploy test's own logic that runs without its engines: what it blames on itself when it
compares the host before and after, and the summary CI reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_engines.host import HostState, StateDiff
from deploy_engines.report import CheckFailed, Report


def test_only_changes_of_the_kinds_the_test_makes_are_blamed_on_it(tmp_path: Path) -> None:
    work = tmp_path / "deploy-test"
    before = HostState(
        links=frozenset({"lo", "eth0", "vnet-br0"}),
        mounts=frozenset({"/", "/run/netns/vnet-a"}),
        sysctls=(("net.ipv4.ip_forward", "0"),),
    )
    after = HostState(
        links=frozenset({"lo", "eth0", "veth1a2b3c", "wanbench-br0"}),
        nft_tables=frozenset({"ip nat", "inet wanbench"}),
        mounts=frozenset(
            {
                "/",
                f"{work}/docker/data",
                "/run/tmdht-deploy/exec/netns/default",
                "/run/netns/wanbench-1",
            }
        ),
        cgroups=frozenset({"cpu:docker", "systemd:payload", "cpuacct:wanbench-1"}),
        paths=frozenset({"/etc/docker/key.json"}),
        sysctls=(("net.ipv4.ip_forward", "1"),),
    )
    diff = before.diff(after, work)
    assert sorted(diff.ours) == sorted([
        "link +veth1a2b3c", "nft table +ip nat", f"mount +{work}/docker/data",
        "mount +/run/tmdht-deploy/exec/netns/default", "cgroup +cpu:docker",
        "cgroup +systemd:payload", "path +/etc/docker/key.json",
        "sysctl net.ipv4.ip_forward: 0 -> 1",
    ])  # fmt: skip
    assert sorted(diff.foreign) == sorted([
        "link +wanbench-br0", "link -vnet-br0", "nft table +inet wanbench",
        "mount +/run/netns/wanbench-1", "mount -/run/netns/vnet-a", "cgroup +cpuacct:wanbench-1",
    ])  # fmt: skip
    assert before.diff(before, work) == StateDiff([], [])


def test_the_host_can_be_recorded(tmp_path: Path) -> None:
    state = HostState.record(tmp_path)
    assert "lo" in state.links and "/" in state.mounts
    assert dict(state.sysctls)["net.ipv4.ip_forward"] in {"0", "1"}


def test_summary_ends_with_the_count_ci_reads() -> None:
    report = Report()
    with report.phase("one"):
        with report.step("passes") as notes:
            notes.append("fine")
        with report.step("fails"):
            raise CheckFailed("not fine")
        with report.step("never runs"):  # the phase ended at the failure
            pytest.fail("ran after a failed step")
    lines = report.summary().splitlines()
    assert lines[-1] == "deploy: 1 passed, 1 failed"
    assert [line.split()[0] for line in lines[1:-1]] == ["PASS", "FAIL"]
