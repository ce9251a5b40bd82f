"""deploy/prometheus: promtool checks the config and the rules and runs the rules' unit tests;
every alert has a test and names only metrics that exist. Then a real Prometheus (a child
process of the test, on a free loopback port) scrapes a local 3-node cluster with the real rules
loaded, and its HTTP API shows every node up with its tmdht metrics."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cluster import FAST_NODE_ARGS, cluster_auth, make_pages

from tmdht.aio.dataplane import DataPlaneClient
from tmdht.node.local import LocalCluster

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "rules" / "tmdht-alerts.yml"
RULE_TESTS = PROMETHEUS / "tests" / "tmdht-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tmdht-cluster.json"
NODE_JOB = "tmdht-nodes"


def promtool(
    tool: Callable[[str], str], *args: str, cwd: Path = PROMETHEUS
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, check=False,
        cwd=cwd,
    )  # fmt: skip


def test_promtool_checks_the_config(debian_tool: Callable[[str], str]) -> None:
    proc = promtool(debian_tool, "check", "config", CONFIG.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The config pulls in the rules (checked with it) and the target files.
    assert "SUCCESS" in proc.stdout and RULES.name in proc.stdout


def test_promtool_checks_the_rules(debian_tool: Callable[[str], str]) -> None:
    proc = promtool(debian_tool, "check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_runs_the_rule_unit_tests(debian_tool: Callable[[str], str]) -> None:
    proc = promtool(debian_tool, "test", "rules", str(RULE_TESTS.relative_to(PROMETHEUS)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.fixture(scope="module")
def rules(load_yaml: Callable[[Path], list[Any]]) -> list[dict[str, Any]]:
    (doc,) = load_yaml(RULES)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_is_unit_tested_firing(
    rules: list[dict[str, Any]], load_yaml: Callable[[Path], list[Any]]
) -> None:
    (doc,) = load_yaml(RULE_TESTS)
    fired = {
        case["alertname"]
        for test in doc["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = {rule["alert"] for rule in rules}
    assert alerts == fired, f"alerts without a firing test: {sorted(alerts - fired)}"
    # The list, by what each alert watches.
    watched = " ".join(rule["expr"] for rule in rules)
    for metric in (
        "up{",
        "tmdht_under_replicated_pages",
        "tmdht_replication_backlog_pages",
        "tmdht_client_verification_failures_total",
        "tmdht_stored_bytes",
        "tmdht_capacity_bytes",
        "tmdht_client_resolve_duration_seconds_bucket",
    ):
        assert metric in watched


def test_alerts_name_only_known_metrics_and_jobs(
    rules: list[dict[str, Any]],
    known_metrics: set[str],
    metric_names_of: Callable[[str], set[str]],
    load_yaml: Callable[[Path], list[Any]],
) -> None:
    for rule in rules:
        unknown = metric_names_of(rule["expr"]) - known_metrics
        assert not unknown, f"{rule['alert']} names {sorted(unknown)}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    (config,) = load_yaml(CONFIG)
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {NODE_JOB, "tmdht-receivers"} <= jobs
    # Label values the rules rely on are ones the node uses.
    from tmdht import wire

    reasons = {s.name.lower().removeprefix("rejected_") for s in wire.PutStatus}
    assert "full" in reasons
    assert any('reason="full"' in rule["expr"] for rule in rules)


# ------------------------------------------------------------------------------------------
# A real Prometheus scraping a real cluster


def free_port() -> int:
    """A loopback TCP port free right now (Prometheus cannot report the port it bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        doc = json.load(response)
    assert doc["status"] == "success", doc
    return doc["data"]


def poll(check: Callable[[], Any], what: str, proc: subprocess.Popen[bytes], log: Path) -> Any:
    """Ask Prometheus until ``check()`` is truthy: at most 150 tries and 45 s."""
    deadline = time.monotonic() + 45
    last: Any = None
    for _ in range(150):
        if proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited ({proc.returncode}): {log.read_text()[-2000:]}"
            )
        try:
            last = check()
        except OSError:  # URLError, refused, reset, timeout: not listening (yet)
            last = None
        if last:
            return last
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)  # poll interval between questions to another process
    raise AssertionError(f"{what}: not true within 45 s (last: {last!r})")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster"), 3, extra_args=FAST_NODE_ARGS) as c:
        yield c


@pytest.fixture(scope="module")
def prometheus(
    cluster: LocalCluster,
    tmp_path_factory: pytest.TempPathFactory,
    debian_tool: Callable[[str], str],
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """A Prometheus child process scraping the cluster every second, with the real rules."""
    root = tmp_path_factory.mktemp("prometheus")
    targets = ", ".join(
        '"{}:{}"'.format(*node.address("metrics")) for node in cluster.nodes
    )  # fmt: skip
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: [{json.dumps(str(RULES))}]\n"
        f"scrape_configs:\n  - job_name: {NODE_JOB}\n    static_configs:\n"
        f"      - targets: [{targets}]\n"
    )
    log = root / "prometheus.log"
    proc, base = start_prometheus(debian_tool("prometheus"), config, root, log)
    try:
        yield base, proc, log
    finally:
        stop(proc)


def start_prometheus(
    binary: str, config: Path, root: Path, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Start Prometheus on a free port and wait until it is ready. The port is free when
    chosen but another process may take it first: then try another (at most 3 times)."""
    for _ in range(3):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=out, cwd=root,
            )  # fmt: skip
        try:
            poll(functools.partial(ready, base), "prometheus ready", proc, log)
            return proc, base
        except AssertionError:
            stop(proc)
            if "address already in use" not in log.read_text():
                raise
    raise AssertionError("no free port for prometheus in 3 tries")


def ready(base: str) -> bool:
    with urllib.request.urlopen(f"{base}/-/ready", timeout=5) as response:
        return response.status == 200


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process we started, SIGKILL it if it does not exit in 20 s."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_prometheus_scrapes_every_node(
    cluster: LocalCluster, prometheus: tuple[str, subprocess.Popen[bytes], Path]
) -> None:
    base, proc, log = prometheus
    expected = {"{}:{}".format(*n.address("metrics")) for n in cluster.nodes}

    def all_up() -> bool:
        active = api(base, "/api/v1/targets", state="active")["activeTargets"]
        health = {t["labels"]["instance"]: t["health"] for t in active}
        return health == dict.fromkeys(expected, "up")

    poll(all_up, "every node's target up", proc, log)

    def node_ids() -> set[str]:
        result = api(base, "/api/v1/query", query=f'tmdht_node_info{{job="{NODE_JOB}"}}')
        return {r["metric"]["node_id"] for r in result["result"]}

    assert poll(node_ids, "tmdht_node_info of every node", proc, log) == {
        n.status["node_id"] for n in cluster.nodes
    }
    names = set(api(base, "/api/v1/label/__name__/values"))
    gauges = {
        "tmdht_stored_pages", "tmdht_stored_bytes", "tmdht_capacity_bytes", "tmdht_ready",
        "tmdht_known_peers", "tmdht_replication_backlog_pages", "tmdht_under_replicated_pages",
    }  # fmt: skip
    assert gauges <= names

    # Pages put into the ring show up, R=3 copies on 3 nodes, in Prometheus's sum.
    pages = make_pages(40, tag=41)

    async def put() -> None:
        async with await DataPlaneClient.open(cluster_auth(cluster)) as client:
            await client.put_pages(cluster.nodes[0].address("data"), pages)

    asyncio.run(asyncio.wait_for(put(), 60))

    def copies() -> bool:
        result = api(base, "/api/v1/query", query=f'sum(tmdht_stored_pages{{job="{NODE_JOB}"}})')
        return bool(result["result"]) and float(result["result"][0]["value"][1]) == 3 * len(pages)

    poll(copies, "3 copies of every page counted", proc, log)

    def latency_recorded() -> bool:
        return "tmdht_request_duration_seconds_bucket" in api(base, "/api/v1/label/__name__/values")

    poll(latency_recorded, "request latency histogram scraped", proc, log)


@pytest.mark.slow
def test_prometheus_loads_the_rules_and_runs_the_dashboard_queries(
    prometheus: tuple[str, subprocess.Popen[bytes], Path],
    as_promql: Callable[[str], str],
) -> None:
    base, proc, log = prometheus

    def groups() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = api(base, "/api/v1/rules")["groups"]
        return found

    loaded = poll(groups, "rule groups loaded", proc, log)
    rules = [rule for group in loaded for rule in group["rules"]]
    assert len(rules) >= 10 and all(rule["health"] in {"ok", "unknown"} for rule in rules)
    # Every dashboard query parses and evaluates in the real query engine.
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            api(base, "/api/v1/query", query=as_promql(target["expr"]))
    # No alert fires on a healthy cluster.
    alerts = api(base, "/api/v1/alerts")["alerts"]
    assert [a for a in alerts if a["state"] == "firing"] == []
