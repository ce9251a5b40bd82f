"""deploy/systemd: systemd-analyze verifies the unit (pointed at the installed tmdht), rates its
hardening, and its command line and sample config agree with what the node accepts."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.deploy import PLACEHOLDER, check_key_reload, fill_sample, unit_entries

from tmdht.errors import ConfigError

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "tmdht-node@.service"
SAMPLE = UNIT.with_name("node.toml")
SYSCTL = UNIT.with_name("90-tmdht.conf")
INSTALLED_AS = "/opt/tmdht/bin/tmdht"
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 is locked down, 10 is wide open


ENTRIES = unit_entries(UNIT.read_text())


def expand(line: str, instance: str = "a", credentials: str = "/run/credentials/x",
           runtime: str = "/run") -> str:
    """A unit line with the specifiers it uses replaced as systemd would (%t: /run)."""
    return line.replace("%i", instance).replace("%d", credentials).replace("%t", runtime)


def exec_start(instance: str = "a", credentials: str = "/run/credentials/x") -> list[str]:
    (line,) = ENTRIES["Service.ExecStart"]
    return shlex.split(expand(line, instance, credentials))


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unit, as a template and as an instance, with ExecStart naming the installed tmdht."""
    tmdht = Path(sys.executable).with_name("tmdht")
    assert tmdht.exists(), f"no tmdht console script beside {sys.executable}"
    text = UNIT.read_text()
    assert text.count(INSTALLED_AS) == 1, f"ExecStart should run {INSTALLED_AS}"
    directory = tmp_path_factory.mktemp("systemd")
    for name in ("tmdht-node@.service", "tmdht-node@a.service"):
        (directory / name).write_text(text.replace(INSTALLED_AS, str(tmdht)))
    return directory


@pytest.mark.parametrize("name", ["tmdht-node@.service", "tmdht-node@a.service"])
def test_systemd_analyze_verifies_the_unit(
    unit_dir: Path, name: str, debian_tool: Callable[[str], str]
) -> None:
    proc = subprocess.run(
        [debian_tool("systemd-analyze"), "verify", "--man=no", str(unit_dir / name)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # verify exits 0 on unknown keys and bad values too, and only warns: any line about our unit
    # (lines about the host's own units are not ours to judge) is a failure.
    ours = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if "tmdht-node" in line or str(unit_dir) in line
    ]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


def test_verify_catches_what_it_should(
    tmp_path: Path, unit_dir: Path, debian_tool: Callable[[str], str]
) -> None:
    """The check above is not vacuous: a typo'd key and a missing binary are reported."""
    broken = (unit_dir / "tmdht-node@a.service").read_text()
    broken = broken.replace("NoNewPrivileges=", "NoNewPrivilege=")
    broken = re.sub(r"ExecStart=\S+", "ExecStart=/nonexistent/tmdht", broken)
    path = tmp_path / "tmdht-node@b.service"
    path.write_text(broken)
    proc = subprocess.run(
        [debian_tool("systemd-analyze"), "verify", "--man=no", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert "NoNewPrivilege" in output and "/nonexistent/tmdht" in output


def test_hardening_exposure_is_low(unit_dir: Path, debian_tool: Callable[[str], str]) -> None:
    proc = subprocess.run(
        [debian_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager",
         str(unit_dir / "tmdht-node@a.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_unit_has_the_required_settings() -> None:
    one = {key: values[-1] for key, values in ENTRIES.items()}
    assert one["Service.DynamicUser"] == "yes"
    # One user per instance: instances sharing one could signal or trace each other.
    assert "%i" in one["Service.User"]
    # Readiness: the node sends READY=1 (tmdht.aio.system.notify_supervisor).
    assert one["Service.Type"] == "notify" and one["Service.NotifyAccess"] == "main"
    assert one["Service.StateDirectory"] == "tmdht/%i"
    assert one["Service.ProtectSystem"] == "strict"
    assert one["Service.NoNewPrivileges"] == "yes"
    assert int(one["Service.LimitNOFILE"]) >= 65536
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.KillSignal"] == "SIGTERM"
    # The node drains for up to 10 s (DRAIN_TIMEOUT) before closing LMDB: allow that.
    from tmdht.node.service import DRAIN_TIMEOUT

    assert float(one["Service.TimeoutStopSec"]) >= 2 * DRAIN_TIMEOUT
    assert one["Install.WantedBy"] == "multi-user.target"


def test_exec_start_uses_real_flags_and_the_units_paths(node_run_flags: set[str]) -> None:
    argv = exec_start()
    assert argv[:3] == [INSTALLED_AS, "node", "run"]
    used = {arg for arg in argv if arg.startswith("-")}
    assert used <= node_run_flags, f"unknown flags: {sorted(used - node_run_flags)}"
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags["--config"] == "/etc/tmdht/a.toml"
    # data_dir is the StateDirectory, the key file a copy of the credential the unit loads, in
    # its RuntimeDirectory (where `systemctl reload` can replace it).
    assert flags["--data-dir"] == "/var/lib/" + ENTRIES["Service.StateDirectory"][0].replace(
        "%i", "a"
    )
    name, _, source = ENTRIES["Service.LoadCredential"][0].partition(":")
    assert source == "/etc/tmdht/cluster.key"
    runtime = "/run/" + expand(ENTRIES["Service.RuntimeDirectory"][0])
    assert flags["--cluster-key-file"] == f"{runtime}/{name}"
    assert ENTRIES["Service.RuntimeDirectoryMode"] == ["0700"]
    (pre,) = ENTRIES["Service.ExecStartPre"]
    assert shlex.split(expand(pre)) == ["/bin/cp", f"/run/credentials/x/{name}",
                                        flags["--cluster-key-file"]]
    assert ENTRIES["Unit.ConditionPathExists"] == ["/etc/tmdht/%i.toml"]


def test_sample_config_names_no_address_anyone_could_have(
    node_config: Callable[..., Any],
) -> None:
    """Anything run from the sample unmodified would send datagrams to whatever holds its
    addresses (on the machine these tests first ran on, 192.0.2.0/24 was the LAN itself): every
    address is a placeholder, and the node refuses the file until it is replaced."""
    doc = tomllib.loads(SAMPLE.read_text())["node"]
    assert doc["advertise_host"].startswith(PLACEHOLDER)
    for seed in doc["seeds"]:
        host, _, _ = seed.rpartition(":")
        assert host.startswith(PLACEHOLDER) and host.endswith(".invalid"), seed  # RFC 6761
    with pytest.raises(ConfigError, match="advertise_host"):
        node_config(SAMPLE.read_text(), flags={"data_dir": "/var/lib/tmdht/a"})
    with pytest.raises(AssertionError, match="placeholders"):
        fill_sample(SAMPLE.read_text(), advertise_host="127.0.0.1")


def test_sample_config_is_accepted_once_filled_in(
    node_config: Callable[..., Any], node_defaults: dict[str, Any]
) -> None:
    flags = dict(zip(exec_start()[3::2], exec_start()[4::2], strict=True))
    text = fill_sample(
        SAMPLE.read_text(), advertise_host="127.0.0.1", seeds=["127.0.0.1:7400", "localhost:7400"]
    )
    config = node_config(
        text,
        flags={"data_dir": flags["--data-dir"], "cluster_key_file": flags["--cluster-key-file"]},
    )
    assert config.host == "0.0.0.0" and config.advertise_host == "127.0.0.1"
    for port in ("kademlia_port", "data_port", "metrics_port"):
        assert getattr(config, port) == node_defaults[port]
    assert {host for host, _ in config.seeds} and {p for _, p in config.seeds} == {
        node_defaults["kademlia_port"]
    }
    # The unit owns these two: the sample must not pretend to set them.
    text = SAMPLE.read_text()
    assert not re.search(r"^\s*(data_dir|cluster_key_file)\s*=", text, re.M)


def test_sysctl_lets_sockets_get_the_buffers_they_ask_for() -> None:
    from tmdht.aio.sockets import SOCKET_BUFFER
    from tmdht.net.overlay import OverlayConfig

    values = {}
    for raw in SYSCTL.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            values[key.strip()] = int(value)
    wanted = max(SOCKET_BUFFER, OverlayConfig(data_port=1).socket_buffer_bytes)
    assert values == {"net.core.rmem_max": wanted, "net.core.wmem_max": wanted}


def test_reload_replaces_the_key_copy_then_signals_the_node(tmp_path: Path) -> None:
    check_key_reload(ENTRIES, tmp_path)
