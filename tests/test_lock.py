"""The dependency locks (requirements/*.txt, written by scripts/lock.sh): every package pinned
with hashes, in step with pyproject.toml, one version per package across both, and the
virtualenv the tests run in installed from them (scripts/setup.sh)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "requirements" / "dev.txt"
RUNTIME = ROOT / "requirements" / "runtime.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def read_lock(path: Path) -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes) of a pip-compile output with hashes."""
    pins: dict[str, tuple[Version, int]] = {}
    name = None
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            name = canonicalize_name(match.group(1))
            assert name not in pins, f"{path.name}: {name} pinned twice"
            pins[name] = (Version(match.group(2)), 0)
        elif line.strip().startswith("--hash=sha256:") and name is not None:
            version, hashes = pins[name]
            pins[name] = (version, hashes + 1)
        elif line.strip() and not line.lstrip().startswith("#"):
            raise AssertionError(f"{path.name}: unexpected line {line!r}")
    return pins


LOCKS = {"dev": read_lock(DEV), "runtime": read_lock(RUNTIME)}


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_package_is_pinned_with_hashes(lock: str) -> None:
    pins = LOCKS[lock]
    assert pins, f"{lock} lock is empty"
    assert not [name for name, (_, hashes) in pins.items() if hashes == 0]


def test_runtime_lock_is_the_dev_locks_versions() -> None:
    dev, runtime = LOCKS["dev"], LOCKS["runtime"]
    assert set(runtime) <= set(dev)
    assert {n: v for n, (v, _) in runtime.items()} == {n: dev[n][0] for n in runtime}


def _must_pin() -> dict[str, list[str]]:
    build = PYPROJECT["build-system"]["requires"]
    runtime = PYPROJECT["project"]["dependencies"]
    return {
        "runtime": [*runtime, *build, "pip"],
        "dev": [*runtime, *PYPROJECT["project"]["optional-dependencies"]["dev"], *build, "pip"],
    }


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_satisfies_pyproject(lock: str) -> None:
    """Edited pyproject.toml without `bash scripts/lock.sh`: this fails, naming the package."""
    pins = LOCKS[lock]
    for text in _must_pin()[lock]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements/{lock}.txt: bash scripts/lock.sh"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements/{lock}.txt pins {name}=={version}, pyproject.toml wants "
            f"{requirement.specifier}: bash scripts/lock.sh"
        )


def test_the_test_environment_was_installed_from_the_lock() -> None:
    installed = {
        canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()
    }
    wrong = {
        name: (str(version), str(installed.get(name)))
        for name, (version, _) in LOCKS["dev"].items()
        if installed.get(name) != version
    }
    assert not wrong, f"(locked, installed) differ; run bash scripts/setup.sh: {wrong}"
