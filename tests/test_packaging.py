"""Packaging: the wheel carries all import packages; the core stays sans-IO."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_THE_CORE = ("tmdht.aio", "tmdht.node", "tmdht.client", "tmdht.cli", "tmdht.lab")


def core_modules() -> list[str]:
    """Every module of the core: the files under tmdht/, subpackages included."""
    modules = []
    for path in sorted((ROOT / "tmdht").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.append(".".join(p for p in parts if p != "__init__"))
    return modules


def test_every_core_module_imports_no_asyncio_no_sockets_and_no_other_layer() -> None:
    modules = core_modules()
    assert {"tmdht.wire", "tmdht.net.engine", "tmdht.net.membership"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = [m for m in ('asyncio', 'socket', 'selectors', *{OUTSIDE_THE_CORE!r}) "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_wheel_installs_and_imports_every_package(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("tmdht-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    code = (
        "import tmdht, tmdht.aio, tmdht.net, tmdht.migration, tmdht.node, tmdht.client\n"
        "import tmdht.cli, tmdht.lab, pathlib, sys\n"
        "for m in (tmdht, tmdht.aio, tmdht.net, tmdht.node, tmdht.client, tmdht.cli):\n"
        "    assert pathlib.Path(m.__file__).is_relative_to(sys.prefix), m.__file__\n"
    )
    subprocess.run([python, "-c", code], check=True, timeout=60, cwd=tmp_path)
    version = subprocess.run(
        [env_dir / "bin" / "tmdht", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "0.1.0" in version.stdout
    if shutil.which("cargo"):  # the wheel carries tmdht._native, built by setuptools-rust
        assert "migration pipeline: native" in version.stdout, version.stdout


def test_setup_installs_nothing_when_nothing_changed() -> None:
    """scripts/setup.sh (run by the test command before pytest) reinstalls the Python packages
    only when what they come from changed (the lock requirements/dev.txt, pyproject.toml, the
    script, the Rust crate): a second run is silent."""
    venv = Path(sys.prefix)
    if not (venv / ".tmdht-setup-stamp").exists():
        pytest.skip("this interpreter's venv was not made by scripts/setup.sh")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh")],
        capture_output=True, text=True, timeout=600, check=True,
        env={**os.environ, "TMDHT_VENV": str(venv)},
    )  # fmt: skip
    said = [line for line in proc.stderr.splitlines() if not line.startswith("setup: warning:")]
    assert proc.stdout == "" and not said, proc.stderr  # (a missing Rust toolchain is said)


def test_license_is_an_spdx_expression() -> None:
    """A TOML table (``{ text = ... }``) made setuptools print a deprecation three times."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
