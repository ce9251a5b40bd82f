"""deploy/grafana: the dashboard parses, covers what operators need, every query is valid PromQL
(promtool) and names only metrics the node or client code exports, Prometheus's own `up`, or the
allow-listed future migration metrics (FUTURE_METRICS in this folder's conftest)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "tmdht-cluster.json"
MIGRATION_METRICS = {
    "tmdht_migration_template_pages_total",
    "tmdht_migration_pages_total",
    "tmdht_migration_wan_bytes_total",
    "tmdht_migration_qemu_bytes_total",
    "tmdht_migration_fallback_pages_total",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_only_the_dashboards_we_test() -> None:
    assert sorted(p.name for p in DASHBOARDS.iterdir()) == [DASHBOARD.name]


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Cluster overview", "Clients (migration receivers)", "Migrations"]


def test_dashboard_shows_what_the_issue_asks_for(
    dashboard: dict[str, Any], metric_names_of: Callable[[str], set[str]]
) -> None:
    named = set().union(*(metric_names_of(expr) for _, expr in targets(dashboard)))
    overview = {
        "up",  # nodes up
        "tmdht_stored_pages",
        "tmdht_stored_bytes",
        "tmdht_requests_total",
        "tmdht_request_duration_seconds_bucket",
        "tmdht_replication_backlog_pages",
        "tmdht_under_replicated_pages",
    }
    assert overview <= named
    assert named >= MIGRATION_METRICS
    exprs = [expr for _, expr in targets(dashboard)]
    assert any("histogram_quantile(0.99" in e and "tmdht_request_duration" in e for e in exprs)


def test_queries_name_only_exported_or_allow_listed_metrics(
    dashboard: dict[str, Any],
    known_metrics: set[str],
    metric_names_of: Callable[[str], set[str]],
) -> None:
    for title, expr in targets(dashboard):
        unknown = metric_names_of(expr) - known_metrics
        assert not unknown, f"panel {title!r} names {sorted(unknown)}"


def test_allow_list_holds_only_metrics_nobody_exports_yet(
    future_metrics: frozenset[str], exported_metrics: set[str]
) -> None:
    assert future_metrics == MIGRATION_METRICS
    assert not future_metrics & exported_metrics, "exported now: drop it from FUTURE_METRICS"


def test_metric_name_extraction(metric_names_of: Callable[[str], set[str]]) -> None:
    """The PromQL scanner the checks rely on: metric names only."""
    names = metric_names_of
    assert names('sum by (le, type) (rate(a_bucket{job="x", le=~"0.5"}[5m]))') == {"a_bucket"}
    assert names("1 - sum(increase(b[$__range])) / sum(c offset 5m) > 0.5e-2") == {"b", "c"}
    assert names("x and on(instance) y unless ignoring(z) w{a='b'}") == {"x", "y", "w"}
    assert names('count(up{job=~"$job"} == 0) or vector(0)') == {"up"}


def test_queries_are_valid_promql(
    dashboard: dict[str, Any],
    tmp_path: Path,
    as_promql: Callable[[str], str],
    debian_tool: Callable[[str], str],
) -> None:
    # promtool parses rule files: every query becomes a recording rule.
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(targets(dashboard)):
        lines += [
            f"      - record: dashboard:query_{i}",
            f"        expr: {json.dumps(as_promql(expr))}",
        ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [debian_tool("promtool"), "check", "rules", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(targets(dashboard))} rules found" in proc.stdout
