"""The Grafana dashboard (deploy/grafana/kvstore.json) speaks of the metrics a node really
exports, and shows every one of them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvstore.server.metrics import NodeMetrics, NodeState

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "kvstore.json"
METRIC_NAME = re.compile(r"\bkvstore_[a-z_]+")


def _expressions(node: Any) -> Iterator[str]:
    """Every PromQL expression or query in the dashboard, wherever it sits."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item)


def _exported_samples() -> set[str]:
    """The sample names a node's /metrics has once each metric was touched."""
    metrics = NodeMetrics(lambda: NodeState("primary", 3, 2, 10, 4))
    metrics.observe_request("get", "ok", 0.001)
    metrics.replication_seconds.observe(0.001)
    metrics.replication_entries.inc()
    metrics.failovers.labels("dead").inc()
    metrics.transfer_keys.inc()
    metrics.transfer_seconds.observe(1.0)
    metrics.fsync_seconds.observe(0.001)
    text = metrics.exposition().decode()
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_dashboard_uses_only_metrics_a_node_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for expr in _expressions(dashboard) for name in METRIC_NAME.findall(expr)}
    assert used
    assert used <= _exported_samples(), used - _exported_samples()


def test_dashboard_shows_every_metric_family() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    text = " ".join(_expressions(dashboard))
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", s) for s in _exported_samples()}
    missing = {family for family in families if family not in text}
    assert not missing


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", ()):
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
