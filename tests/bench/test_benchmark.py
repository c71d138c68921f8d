"""kv-bench's planning and reporting, without sockets: which configurations run, mixes, rows."""

from __future__ import annotations

import dataclasses

import pytest

from kvstore.bench import capacity, faults
from kvstore.bench.matrix import (
    BASELINE,
    Matrix,
    Scenario,
    format_row,
    header,
    parse_mix,
    summarize,
    why_no_faults,
)


def test_default_matrix_is_the_baseline_then_one_dimension_at_a_time() -> None:
    scenarios = Matrix().scenarios()
    assert scenarios[0] == BASELINE
    assert len(scenarios) == len(set(scenarios)) == 9
    for scenario in scenarios[1:]:
        differing = [f for f in Scenario.__slots__ if getattr(scenario, f) != getattr(BASELINE, f)]
        assert len(differing) == 1, scenario
    assert Scenario(4, 1000, 50, 10, "kill-primary", 1) in scenarios
    assert Scenario(16, 1000, 50, 10, "none", 1) in scenarios


def test_full_matrix_is_the_cross_product() -> None:
    matrix = Matrix(threads=(1, 4), keyspace=(10,), read_percent=(50, 95), procs=(1, 2))
    assert len(matrix.scenarios(full=True)) == 2 * 1 * 2 * 2 * 2 * 2


def test_baseline_falls_back_to_the_first_value_of_a_list_without_the_default() -> None:
    matrix = Matrix(
        threads=(8, 16),
        keyspace=(1000,),
        read_percent=(50,),
        value_bytes=(10,),
        faults=("none",),
        procs=(2, 1),
    )
    assert matrix.scenarios() == [
        Scenario(8, 1000, 50, 10, "none", 1),
        Scenario(16, 1000, 50, 10, "none", 1),
        Scenario(8, 1000, 50, 10, "none", 2),
    ]


def test_a_configuration_whose_faults_never_come_says_why() -> None:
    killing, nemesis = (
        Scenario(4, 1000, 50, 10, "kill-primary", 1),
        Scenario(4, 1000, 50, 10, "nemesis", 1),
    )
    assert why_no_faults(killing, 15.0) is None and why_no_faults(nemesis, 15.0) is None
    assert why_no_faults(BASELINE, 1.0) is None  # no faults asked: nothing missing
    # The first kill comes 4 s in, the nemesis's first fault 3 to 5 s in; none in the last 2 s.
    assert "none fits in 6 s" in str(why_no_faults(killing, 6.0))
    assert why_no_faults(killing, 6.5) is None
    assert "none fits in 5 s" in str(why_no_faults(nemesis, 5.0))
    # A lone copy's primary is never killed (it would lose the store); the nemesis still
    # restarts ZooKeeper there.
    alone = dataclasses.replace(killing, replicas=1)
    assert "no backup" in str(why_no_faults(alone, 15.0))
    assert why_no_faults(dataclasses.replace(nemesis, replicas=1), 15.0) is None


def test_the_demo_kill_fits_when_half_the_run_comes_before_its_last_seconds() -> None:
    # kv-demo kills at half time: in a run of 2 * QUIET_END_S or less, that is too late.
    assert faults.why_no_faults(4.0, 2.0, replicas=2) is not None
    assert faults.why_no_faults(4.2, 2.1, replicas=2) is None
    assert faults.why_no_faults(20.0, 10.0, replicas=1) is not None


def test_scenario_workload_carries_the_mix_and_value_size() -> None:
    workload = Scenario(4, 100, 95, 1024, "none", 1).workload(3.0)
    assert workload.write_ratio == pytest.approx(0.05)
    assert (workload.threads, workload.seconds, workload.keyspace, workload.value_bytes) == (
        4,
        3.0,
        100,
        1024,
    )


@pytest.mark.parametrize(
    ("text", "read_percent"),
    [("50/50", 50), ("95/5", 95), ("100/0", 100), ("a", 50), ("B", 95), ("c", 100)],
)
def test_parse_mix(text: str, read_percent: int) -> None:
    assert parse_mix(text) == read_percent


@pytest.mark.parametrize("text", ["50/40", "x", "95", "d"])
def test_parse_mix_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_mix(text)


def _row(faults: str, throughput: float, round_number: int = 0) -> dict:
    scenario = Scenario(4, 1000, 50, 10, faults, 1)
    return {
        "name": scenario.name,
        "threads": 4,
        "keyspace": 1000,
        "read_percent": 50,
        "mix": "50/50",
        "value_bytes": 10,
        "faults": faults,
        "procs": 1,
        "throughput": throughput,
        "p50_ms": 0.1,
        "p99_ms": 0.5,
        "p999_ms": 1.0,
        "longest_gap_ms": 12.0,
        "failures": 0,
        "indefinite_writes": 0,
        "kills": 3 if faults != "none" else 0,
        "check": "OK",
        "cores": {"client": 0.5, "primary": None},
        "round": round_number,
    }


def test_rows_line_up_with_the_header() -> None:
    line = format_row(_row("none", 20_000))
    assert len(line.rsplit("  ", 1)[0]) == len(header().split("  cores")[0])
    assert "20000" in line and "0.50/-/-/-/-/-" in line


def test_summary_compares_fault_runs_with_their_twin_by_medians() -> None:
    rows = [
        _row("none", 20_000, 0),
        _row("kill-primary", 17_000, 0),
        _row("none", 10_000, 1),
        _row("kill-primary", 16_000, 1),
        _row("none", 22_000, 2),
    ]
    lines = summarize(rows)
    assert any("20000 (10000-22000) ops/s" in line for line in lines)
    assert any("82% of the no-fault throughput" in line and "6 kills" in line for line in lines)


def test_key_bytes_counts_the_key_names() -> None:
    for count in (1, 9, 10, 11, 100, 12_345):
        assert capacity.key_bytes(count) == sum(len(f"key-{i}") for i in range(count))
