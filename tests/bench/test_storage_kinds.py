"""The --storage dimension without sockets: the node arguments of each storage kind, the
option in kv-bench, the matrix and its rows, and what happens to the data directories."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.bench import matrix as matrix_module
from kvstore.bench import session as session_module
from kvstore.bench.matrix import Matrix, Scenario, format_row, header, run_scenario, summarize
from kvstore.bench.session import Session
from kvstore.bench.storage import STORAGE_KINDS, node_args, use_storage
from kvstore.bench.workload import Workload, merge
from kvstore.check import checker
from kvstore.cli import bench as bench_cli
from kvstore.local.cluster import LocalCluster

# --------------------------------------------------------------------------- node arguments


def test_node_args_of_each_storage_kind(tmp_path: Path) -> None:
    data_dir = tmp_path / "node-0"
    assert node_args("memory", data_dir) == []
    assert node_args("disk", data_dir) == ["--data-dir", str(data_dir), "--fsync", "batch"]
    assert node_args("disk-always", data_dir) == [
        "--data-dir",
        str(data_dir),
        "--fsync",
        "always",
    ]
    assert STORAGE_KINDS == ("memory", "disk", "disk-always")


def test_node_args_refuse_an_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown storage kind 'ssd'"):
        node_args("ssd", tmp_path)


def test_every_node_gets_a_data_dir_of_its_own_after_its_other_args(tmp_path: Path) -> None:
    cluster = LocalCluster("127.0.0.1:1", "/x", tmp_path / "logs", node_args=["--cpu", "0"])
    run_dir = tmp_path / "run"
    assert use_storage(cluster, "disk-always", run_dir) == run_dir
    assert [node.extra_args for node in cluster.nodes] == [
        ["--cpu", "0", "--data-dir", str(run_dir / f"node-{i}"), "--fsync", "always"]
        for i in range(2)
    ]
    in_memory = LocalCluster("127.0.0.1:1", "/x", tmp_path / "logs")
    assert use_storage(in_memory, "memory", run_dir) is None
    assert all(node.extra_args == [] for node in in_memory.nodes)


# --------------------------------------------------------------------------- the option


def test_kv_bench_parses_a_storage_list() -> None:
    parser = bench_cli._parser()
    assert parser.parse_args([]).storage == ("memory",)
    assert parser.parse_args(["--storage", "disk"]).storage == ("disk",)
    args = parser.parse_args(["--storage", "memory, disk,disk-always"])
    assert args.storage == ("memory", "disk", "disk-always")


@pytest.mark.parametrize("text", ["ssd", "memory,nvme", "", "disk-batch"])
def test_kv_bench_refuses_an_unknown_storage(text: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_cli._parser().parse_args(["--storage", text])
    assert exit_info.value.code == 2
    assert "storage kinds are memory, disk, disk-always" in capsys.readouterr().err


def test_kv_bench_hands_the_storage_list_to_the_matrix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[Any] = []

    class _FakeSession:
        def __init__(self, matrix: Matrix | None, **_kwargs: Any) -> None:
            seen.append(matrix)

        def run(self, zk_connect: str, zk_pid: int | None) -> dict[str, Any]:
            return {}

    @contextlib.contextmanager
    def fake_zookeeper(_data_dir: Path) -> Iterator[Any]:
        yield type("Zk", (), {"connect_string": "127.0.0.1:1", "pid": None, "restart": None})()

    monkeypatch.setattr(bench_cli, "Session", _FakeSession)
    monkeypatch.setattr(bench_cli, "ZooKeeperServer", fake_zookeeper)
    argv = ["--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")]
    assert bench_cli.main([*argv, "--storage", "memory,disk"]) == 0
    assert bench_cli.main(argv) == 0
    assert [m.storage for m in seen] == [("memory", "disk"), ("memory",)]


# --------------------------------------------------------------------------- the matrix


def test_storage_is_a_matrix_dimension_and_part_of_the_name() -> None:
    matrix = Matrix(
        threads=(4,),
        keyspace=(1000,),
        read_percent=(50,),
        value_bytes=(10,),
        faults=("none",),
        storage=STORAGE_KINDS,
    )
    scenarios = matrix.scenarios()
    assert [s.storage for s in scenarios] == list(STORAGE_KINDS)
    assert scenarios[0] == Scenario(4, 1000, 50, 10, "none", 1)  # memory: the default
    assert [s.name for s in scenarios] == [
        f"t4-k1000-r50-v10-none-p1-auto-{kind}-per-thread" for kind in STORAGE_KINDS
    ]
    full = Matrix(threads=(4, 16), faults=("none",), storage=("memory", "disk"))
    assert len(full.scenarios(full=True)) == 2 * 3 * 3 * 2 * 2


def _row(
    storage: str, throughput: float, p50_ms: float, p99_ms: float, client: str = "per-thread"
) -> dict[str, Any]:
    scenario = Scenario(4, 1000, 50, 10, "none", 1, storage=storage, client=client)
    return {
        "name": scenario.name,
        **{field: getattr(scenario, field) for field in Scenario.__slots__},
        "mix": scenario.mix,
        "throughput": throughput,
        "p50_ms": p50_ms,
        "p99_ms": p99_ms,
        "p999_ms": p99_ms,
        "longest_gap_ms": 5.0,
        "failures": 0,
        "indefinite_writes": 0,
        "kills": 0,
        "check": "OK",
        "cores": {},
    }


def test_rows_show_the_storage_and_the_summary_the_same_run_ratios() -> None:
    assert "storage" in header()
    assert "disk-always" in format_row(_row("disk-always", 1000, 2.0, 9.0))
    rows = [
        _row("memory", 6000, 0.5, 3.0),
        _row("disk", 2000, 1.5, 12.0),
        _row("memory", 4000, 0.5, 3.0),
        _row("disk", 2200, 1.5, 12.0),
        _row("disk-always", 1000, 2.0, 24.0),
    ]
    lines = summarize(rows)
    assert (
        "t4-k1000-r50-v10-none-p1-auto-disk-per-thread: disk/memory ops/s 0.42, p50 3.00, "
        "p99 4.00; per round 0.33 0.55 (median 0.44)" in lines  # (2000/6000, 2200/4000)
    )
    assert any(line.endswith("disk-always/memory ops/s 0.20, p50 4.00, p99 8.00") for line in lines)


def test_rounds_the_host_stole_from_are_marked_and_left_out_of_a_second_median() -> None:
    """A round's ratio swings with whichever side the host stole from: such rounds are
    marked, and the median of the others follows."""
    rows = []
    for memory, disk, steal in ((8000, 4000, 0.0), (6000, 5400, 0.3), (8000, 4800, 0.01)):
        rows.append(_row("memory", memory, 0.5, 3.0))
        rows.append(_row("disk", disk, 1.5, 12.0))
        rows[-1]["cores"] = {"steal": steal}
    lines = summarize(rows)
    disk_line = next(line for line in lines if "disk/memory" in line)
    assert disk_line.endswith(
        "; per round 0.50 0.90* 0.60 (median 0.60; without the * rounds 0.55)"
    ), disk_line


class _NoArtifacts:
    skipped_because = None

    def __init__(self, _directory: Path) -> None:
        pass

    def add_run(self, _row: dict[str, Any]) -> list[Path]:
        return []


def test_every_other_round_runs_the_configurations_backwards_and_rounds_still_pair(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A machine that slows down across each round would, in a fixed order, favour the
    configuration listed first in every ratio alike; backwards every other round, it
    favours each side in turn. The summary still pairs each row with its twin of the
    same round."""
    ran: list[str] = []
    throughput = {"memory": 8000, "disk": 4000}

    def fake_run_one(
        self: Session, _zk: str, _pid: int | None, scenario: Scenario, _label: str
    ) -> dict[str, Any]:
        is_second = len(ran) % 2 == 1  # (the second run of a round goes at half speed)
        ran.append(scenario.storage)
        return _row(
            scenario.storage, throughput[scenario.storage] * (0.5 if is_second else 1), 1, 2
        )

    monkeypatch.setattr(Session, "_run_one", fake_run_one)
    monkeypatch.setattr(session_module, "Artifacts", _NoArtifacts)  # (rows without histograms)
    out: list[str] = []
    session = Session(
        Matrix(threads=(4,), keyspace=(1000,), read_percent=(50,), value_bytes=(10,),
               faults=("none",), storage=("memory", "disk")),
        full=True, seconds=1.0, json_path=tmp_path / "r.json", workdir=tmp_path,
        repeat=4, out=out.append,
    )  # fmt: skip
    session.run("127.0.0.1:1", None)
    assert ran == ["memory", "disk", "disk", "memory"] * 2
    # disk/memory per round: 2000/8000, 4000/4000, ...: the drift favours each side in turn
    disk_line = next(line for line in out if "disk/memory" in line)
    assert disk_line.endswith("; per round 0.25 1.00 0.25 1.00 (median 0.62)"), disk_line


def test_the_summary_puts_a_figure_on_the_shared_client_and_on_exactly_once() -> None:
    rows = [
        _row("memory", 8000, 0.5, 3.0),
        _row("memory", 7000, 0.6, 3.0, client="shared"),
        _row("memory", 7500, 0.5, 3.0, client="shared-noeo"),
    ]
    lines = summarize(rows)
    endings = [line.split(": ", 1)[1] for line in lines]
    assert "shared/per-thread ops/s 0.88, p50 1.20, p99 1.00" in endings
    assert "shared-noeo/per-thread ops/s 0.94, p50 1.00, p99 1.00" in endings
    assert "shared/shared-noeo ops/s 0.93, p50 1.20, p99 1.00" in endings


# --------------------------------------------------------------------------- data directories


class _FakeCluster(LocalCluster):
    """Starts no process: its "nodes" just create their data directories."""

    def start(self, timeout_s: float = 30.0) -> None:
        for node in self.nodes:
            if "--data-dir" in node.extra_args:
                data_dir = Path(node.extra_args[node.extra_args.index("--data-dir") + 1])
                data_dir.mkdir(parents=True)
                (data_dir / "wal-0.log").write_bytes(b"x")

    def find(self, role: str) -> None:
        return None

    def stop(self) -> None:
        pass


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, storage: str, is_ok: bool) -> Any:
    clusters: list[_FakeCluster] = []

    def make_cluster(*args: Any, **kwargs: Any) -> _FakeCluster:
        clusters.append(_FakeCluster(*args, **kwargs))
        return clusters[-1]

    def fake_run(workload: Workload, *_args: Any, on_start: Any = None, **_kwargs: Any) -> Any:
        if on_start is not None:
            on_start()
        return merge(workload, 1.0, [], 0, 0)

    monkeypatch.setattr(matrix_module, "LocalCluster", make_cluster)
    monkeypatch.setattr(matrix_module.load, "run", fake_run)
    monkeypatch.setattr(
        matrix_module, "check_events", lambda _events: checker.CheckResult(is_ok, 0, 0, [])
    )
    scenario = Scenario(4, 1000, 50, 10, "none", 1, storage=storage)
    row = run_scenario("127.0.0.1:1", None, scenario, 1.0, tmp_path)
    return row, clusters[0]


def test_data_dirs_live_under_the_run_dir_and_go_after_a_passing_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    row, cluster = _run(monkeypatch, tmp_path, "disk", is_ok=True)
    assert row["storage"] == "disk" and row["check"] == "OK"
    assert row["data_dir"] is None
    data_dirs = [Path(n.extra_args[n.extra_args.index("--data-dir") + 1]) for n in cluster.nodes]
    run_dir = data_dirs[0].parent
    assert run_dir.parent == tmp_path / row["name"]
    assert [d.name for d in data_dirs] == ["node-0", "node-1"]
    assert not run_dir.exists()


def test_data_dirs_are_kept_after_a_failed_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    row, _cluster = _run(monkeypatch, tmp_path, "disk-always", is_ok=False)
    assert row["check"].startswith("VIOLATIONS")
    kept = Path(row["data_dir"])
    assert sorted(p.name for p in kept.iterdir()) == ["node-0", "node-1"]
    assert (kept / "node-0" / "wal-0.log").exists()
    assert row["log"] is not None and Path(row["log"]).exists()


def test_a_run_in_memory_has_no_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    row, cluster = _run(monkeypatch, tmp_path, "memory", is_ok=True)
    assert row["data_dir"] is None
    assert all(node.extra_args == [] for node in cluster.nodes)


def test_recovery_is_the_longest_gap_until_the_next_fault() -> None:
    from kvstore.bench.faults import recovery_s

    faults_at = [(1.0, "kill-primary", "a"), (5.0, "hostile", "a"), (9.0, "pause-primary", "a")]
    responses_ns = [int(t * 1e9) for t in (0.5, 1.2, 3.0, 3.1, 5.01, 5.02, 8.0)]
    gaps = recovery_s(faults_at, responses_ns)
    assert [round(g, 2) for g in gaps] == [1.9, 2.98, -1.0]
