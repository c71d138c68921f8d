"""kv-bench --transport: a run over mutual TLS on a real cluster, and its place in the
matrix, the table and the summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.bench.matrix import TRANSPORTS, Matrix, Scenario, run_scenario, summarize
from kvstore.cli import bench as bench_cli
from kvstore.local.zkserver import ZooKeeperServer


def test_a_tls_run_talks_tls_end_to_end_and_its_history_checks(
    zk_server: ZooKeeperServer, tmp_path: Path
) -> None:
    scenario = Scenario(4, 100, 50, 10, "none", 1, transport="tls")
    row = run_scenario(zk_server.connect_string, zk_server.pid, scenario, 2.0, tmp_path)
    assert row["transport"] == "tls" and row["name"].endswith("-tls")
    assert row["check"] == "OK" and row["successes"] > 0 and row["failures"] == 0
    logs = sorted((tmp_path / scenario.name).glob("node-*.log"))
    assert len(logs) == 2
    for log in logs:
        started = log.read_text().split("--- starting:", 1)[1].splitlines()[0]
        assert "--tls-cert" in started and "node.crt" in started


def test_transport_is_a_dimension_of_the_matrix_the_option_and_the_summary() -> None:
    assert TRANSPORTS == ("plain", "tls")
    assert bench_cli._parser().parse_args(["--transport", "plain,tls"]).transport == TRANSPORTS
    with pytest.raises(SystemExit):
        bench_cli._parser().parse_args(["--transport", "ssl"])
    matrix = Matrix((4,), (1000,), (50,), (10,), ("none",), transport=TRANSPORTS)
    assert [s.transport for s in matrix.scenarios()] == ["plain", "tls"]
    rows = []
    for transport, throughput in (("plain", 8000.0), ("tls", 6000.0)):
        scenario = Scenario(4, 1000, 50, 10, "none", 1, transport=transport)
        rows.append(
            {
                "name": scenario.name,
                **{field: getattr(scenario, field) for field in Scenario.__slots__},
                "throughput": throughput,
                "p50_ms": 1.0,
                "p99_ms": 2.0,
                "longest_gap_ms": 1.0,
                "kills": 0,
                "check": "OK",
            }
        )
    assert any(
        line.endswith("tls/plain ops/s 0.75, p50 1.00, p99 1.00") for line in summarize(rows)
    )
