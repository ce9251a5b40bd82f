"""``tmdht qemu send``'s click-free fast path takes exactly what click would take the same way,
and hands everything else to click; ``tmdht --version`` names the migration pipeline in use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tmdht.catalog import TemplateCatalog
from tmdht.cli.fastpath import parse_send
from tmdht.cli.main import cli


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "t.tmc"
    TemplateCatalog.from_digests([bytes(range(1, 33))]).save(path)
    return path


def _click_config(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[Any, ...]:
    """What the click command builds from ``argv`` (run_proxy intercepted)."""
    seen: list[tuple[Any, ...]] = []
    captured: list[Any] = []
    monkeypatch.setattr(
        "tmdht.client.migration.run_sender", lambda config, **__: captured.append(config)
    )

    def fake_run_proxy(
        role: str,
        progress: bool,
        metrics_port: int | None,
        report_path: Path | None,
        start: Any,
        **_: Any,
    ) -> None:
        start(None, lambda *a: None)
        seen.append((captured[0], report_path))

    monkeypatch.setattr("tmdht.cli.qemu.run_proxy", fake_run_proxy)
    monkeypatch.setattr("tmdht.cli.qemu.setup_logging", lambda level: seen.append((level,)))
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (level,), (config, report) = seen
    return config, report, level


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--compress"],
        ["--backref-window", "64", "--flow-window", "8MiB"],
        ["--flow-window=1G", "--connect-timeout=2.5", "--done-timeout", "9"],
        ["--report", "r.json", "--log-level", "info", "--compress"],
        ["--tls-creds", "creds", "--tls-authz", "CN=dst,O=x", "--tls-hostname", "dst"],
        ["--tls-creds=creds"],
        ["--insecure-plaintext"],
    ],
)
def test_fast_path_builds_what_click_builds(
    monkeypatch: pytest.MonkeyPatch, catalog: Path, extra: list[str]
) -> None:
    argv = ["qemu", "send", "--catalog", str(catalog), "--to", "127.0.0.1:7000", *extra]
    for key in [k for k in os.environ if k.startswith("TMDHT_QEMU_SEND_")]:
        monkeypatch.delenv(key)
    fast = parse_send(argv)
    assert fast is not None
    assert fast == _click_config(monkeypatch, argv)


@pytest.mark.parametrize(
    "extra",
    [
        ["--help"],
        ["--progress"],
        ["--metrics-port", "0"],
        ["--unknown"],
        ["--backref-window", "0"],
        ["--backref-window", "x"],
        ["--flow-window", "lots"],
        ["--to", "nowhere"],
        ["--to", "192.0.2.1:7000"],  # plaintext off loopback: click says why
        ["--tls-authz", "CN=x"],  # without --tls-creds
        ["--tls-creds", "c", "--tls-authz", "CN=a", "--tls-authz", "CN=b"],
        ["--tls-creds", "c", "--tls-authz", "not a subject"],
        ["positional"],
        ["--report"],
    ],
)
def test_fast_path_hands_anything_else_to_click(catalog: Path, extra: list[str]) -> None:
    argv = ["qemu", "send", "--catalog", str(catalog), *extra]
    if "--to" not in extra:
        argv += ["--to", "127.0.0.1:7000"]
    assert parse_send(argv) is None


def test_fast_path_leaves_environment_settings_and_other_commands_to_click(
    monkeypatch: pytest.MonkeyPatch, catalog: Path, tmp_path: Path
) -> None:
    argv = ["qemu", "send", "--catalog", str(catalog), "--to", "127.0.0.1:7000"]
    assert parse_send(["qemu", "receive", *argv[2:]]) is None
    assert (
        parse_send(
            ["qemu", "send", "--catalog", str(tmp_path / "missing"), "--to", "127.0.0.1:7000"]
        )
        is None
    )
    monkeypatch.setenv("TMDHT_QEMU_SEND_COMPRESS", "1")
    assert parse_send(argv) is None


@pytest.mark.parametrize("native", ["0", "1"])
def test_version_names_the_pipeline(native: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tmdht.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMDHT_NATIVE": native},
        check=True,
    )
    first, second = proc.stdout.splitlines()
    assert "version 0.1.0" in first
    if native == "0":
        assert second.startswith("migration pipeline: pure-Python reference (TMDHT_NATIVE=0)")
    else:
        from support.cores import native_available

        expected = "native" if native_available() else "pure-Python reference"
        assert second.startswith(f"migration pipeline: {expected}")


def test_without_the_module_the_reference_runs() -> None:
    """Where tmdht._native was not built, importing tmdht.native falls back and says why."""
    code = (
        "import sys; sys.modules['tmdht._native'] = None\n"
        "import tmdht.native as n\n"
        "print(n.implementation()); print(n.describe())\n"
        "print(type(n.make_receiver()).__name__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "TMDHT_NATIVE": "1"},
    )
    implementation, description, receiver = proc.stdout.splitlines()
    assert implementation == "reference"
    assert "not built" in description
    assert receiver == "ReferenceReceiver"
