"""deploy/systemd/tmdht-vnet.service: systemd-analyze verifies it (pointed at the installed
tmdht), its hardening is rated, and its command line and sample config agree with what
``tmdht vnet run`` accepts."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support.deploy import check_key_reload, unit_entries

from tmdht.cli.vnet import vnet_run
from tmdht.vnet_config import VnetConfig

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "tmdht-vnet.service"
SAMPLE = UNIT.with_name("vnet.toml")
INSTALLED_AS = "/opt/tmdht/bin/tmdht"
MAX_EXPOSURE = 3.0  # it keeps CAP_NET_ADMIN (tap ports) and /dev/net/tun


def entries() -> dict[str, list[str]]:
    return unit_entries(UNIT.read_text())


def exec_start() -> list[str]:
    (line,) = entries()["Service.ExecStart"]
    return shlex.split(line.replace("%d", "/run/credentials/x").replace("%t", "/run"))


@pytest.fixture(scope="module")
def unit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmdht = Path(sys.executable).with_name("tmdht")
    text = UNIT.read_text()
    assert text.count(INSTALLED_AS) == 1
    path = tmp_path_factory.mktemp("systemd-vnet") / "tmdht-vnet.service"
    path.write_text(text.replace(INSTALLED_AS, str(tmdht)))
    return path


def test_systemd_analyze_verifies_the_unit(unit_path: Path,
                                           debian_tool: Callable[[str], str]) -> None:
    proc = subprocess.run([debian_tool("systemd-analyze"), "verify", "--man=no", str(unit_path)],
                          capture_output=True, text=True, timeout=60, check=False)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if "tmdht-vnet" in line or str(unit_path.parent) in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


def test_hardening_exposure_is_low(unit_path: Path, debian_tool: Callable[[str], str]) -> None:
    proc = subprocess.run([debian_tool("systemd-analyze"), "security", "--offline=yes",
                           "--no-pager", str(unit_path)],
                          capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_exec_start_flags_parse_and_the_sample_config_is_accepted() -> None:
    argv = exec_start()
    assert argv[:3] == [INSTALLED_AS, "vnet", "run"]
    context = vnet_run.make_context("run", argv[3:])  # click refuses unknown flags
    flags = {k: v for k, v in context.params.items()
             if k in ("data_dir", "control_socket", "cluster_key_file")}
    config = VnetConfig.from_sources(toml_text=SAMPLE.read_text(), flags=flags)
    assert config.site and config.seeds and config.encrypt == "wan"
    assert str(config.control_path) == "/run/tmdht-vnet/control.sock"
    assert str(config.data_dir) == "/var/lib/" + entries()["Service.StateDirectory"][0]
    assert not re.search(r"^\s*(data_dir|cluster_key_file|control_socket)\s*=",
                         SAMPLE.read_text(), re.M)


def test_reload_replaces_the_key_copy_then_signals_the_agent(tmp_path: Path) -> None:
    check_key_reload(entries(), tmp_path)
