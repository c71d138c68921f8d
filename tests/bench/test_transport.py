"""kv-bench --transport: a run over mutual TLS on a real cluster, and its place (and that of
--io) in the matrix, the table and the summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.bench.matrix import (
    IO_KINDS,
    TRANSPORTS,
    Matrix,
    Scenario,
    run_scenario,
    summarize,
)
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


@pytest.mark.parametrize(
    ("dimension", "kinds", "wrong"),
    [("transport", TRANSPORTS, "ssl"), ("io", IO_KINDS, "asyncio")],
)
def test_transport_and_io_are_dimensions_of_the_matrix_the_options_and_the_summary(
    dimension: str, kinds: tuple[str, str], wrong: str
) -> None:
    assert (
        bench_cli._parser().parse_args([f"--{dimension}", ",".join(kinds)]).__dict__[dimension]
        == kinds
    )
    with pytest.raises(SystemExit):
        bench_cli._parser().parse_args([f"--{dimension}", wrong])
    matrix = Matrix((4,), (1000,), (50,), (10,), ("none",), **{dimension: kinds})
    assert [getattr(s, dimension) for s in matrix.scenarios()] == list(kinds)
    rows = []
    for kind, throughput in zip(kinds, (8000.0, 6000.0), strict=True):
        scenario = Scenario(4, 1000, 50, 10, "none", 1, **{dimension: kind})
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
    assert rows[1]["name"].endswith(f"-{kinds[1]}") and rows[0]["name"] != rows[1]["name"]
    ratio = f"{kinds[1]}/{kinds[0]} ops/s 0.75, p50 1.00, p99 1.00"
    assert any(line.endswith(ratio) for line in summarize(rows))


def test_a_run_with_deletes_and_compare_and_sets_sends_them_and_its_history_checks(
    zk_server: ZooKeeperServer, tmp_path: Path
) -> None:
    """kv-bench --delete-ratio/--cas-ratio (issue 8: the benchmark runs a mix with them and
    still prints a verdict); they come out of the mix's writes and need the shared Client."""
    scenario = Scenario(4, 20, 50, 10, "none", 1, client="shared")
    row = run_scenario(
        zk_server.connect_string, zk_server.pid, scenario, 2.0, tmp_path,
        delete_ratio=0.1, cas_ratio=0.2,
    )  # fmt: skip
    assert row["check"] == "OK" and row["failures"] == 0
    assert row["deletes"] > 0 and row["compare_and_sets"] > row["deletes"], row
    parser = bench_cli._parser()
    for wrong in (
        ["--delete-ratio", "0.1"],  # per-thread clients
        ["--client", "shared", "--mix", "95/5", "--cas-ratio", "0.1"],  # 5 % writes only
    ):
        args = parser.parse_args(wrong)
        matrix = Matrix(client=args.client, read_percent=args.mix)
        with pytest.raises(SystemExit):
            bench_cli._check_deletes_and_cas(parser, matrix, args.delete_ratio, args.cas_ratio)
