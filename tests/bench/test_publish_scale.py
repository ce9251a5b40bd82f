"""bench/publish_scale.py reads the counters it reports from a node's real /metrics text."""

from __future__ import annotations

import sys
from pathlib import Path

from prometheus_client import generate_latest

from tmdht.node.metrics import NodeMetrics

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import publish_scale


def test_metric_totals_reads_requests_commits_and_copies() -> None:
    metrics = NodeMetrics()
    metrics.requests.labels("has").inc(3)
    metrics.requests.labels("put_pages").inc(5)
    metrics.group_commit_pages.labels().observe(7)
    metrics.group_commit_pages.labels().observe(21)
    metrics.replicated.inc(4)
    text = generate_latest(metrics.registry).decode()
    totals = publish_scale.metric_totals(text)
    assert totals["has"] == 3 and totals["put_pages"] == 5
    assert totals["group_commits"] == 2 and totals["group_commit_pages"] == 28
    assert totals["replicated_pages"] == 4
