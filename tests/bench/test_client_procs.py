"""kv-client --procs: the threads spread over worker processes, one merged report and log."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from kvstore.check.history import read_log
from kvstore.coordination import create_parent
from kvstore.local.cluster import LocalCluster
from kvstore.local.zkserver import ZooKeeperServer

SECONDS = 3
# Start-up of the client and its worker processes, and the results coming back.
GRACE_S = 60

SEED_LINES = (
    re.compile(r"^Aggregate throughput: \d+ RPCs/s$", re.MULTILINE),
    re.compile(r"^Average latency: \d+\.\d{3} ms$", re.MULTILINE),
)


def _kv(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_client_with_two_processes_writes_one_checkable_log(
    shared_cluster: LocalCluster, tmp_path: Path
) -> None:
    log_path = tmp_path / "execution.log"
    done = _kv(
        "client", shared_cluster.zk_connect, shared_cluster.zk_path, "4", str(SECONDS), "100",
        "--procs", "2", "--log", str(log_path), timeout_s=SECONDS + GRACE_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for line in SEED_LINES:
        assert line.search(done.stdout), done.stdout
    assert f"Execution log: {log_path}" in done.stdout

    ops = read_log(log_path)
    assert ops
    by_process: dict[int, set[int]] = defaultdict(set)
    for op in ops:
        by_process[op.tid // 1000].add(op.tid)
    assert by_process == {0: {0, 1}, 1: {1000, 1001}}
    successes = int(re.search(r"Successful operations: (\d+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert sum(not op.is_pending for op in ops) == successes

    check = _kv("check", str(log_path), timeout_s=GRACE_S)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("OK"), check.stdout


def test_client_with_two_processes_ends_by_itself_without_nodes(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path
) -> None:
    create_parent(zk_server.connect_string, zk_path)  # a cluster path nobody serves
    done = _kv(
        "client", zk_server.connect_string, zk_path, "2", "2", "10",
        "--procs", "2", "--log", str(tmp_path / "execution.log"), timeout_s=2 + GRACE_S,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr  # (no operation succeeded)
    assert "no operation succeeded" in done.stderr
    assert "Successful operations: 0 in" in done.stdout
    assert "UnavailableError=" in done.stdout


def test_a_second_run_on_the_same_cluster_logs_what_the_first_left(
    shared_cluster: LocalCluster, tmp_path: Path
) -> None:
    """The checker takes every key to start empty: a run logs the values earlier runs left
    as its starting values, or its reads of them would be reads of values never written."""
    for run in ("first", "second"):
        log_path = tmp_path / f"{run}.log"
        done = _kv(
            "client", shared_cluster.zk_connect, shared_cluster.zk_path, "2", "2", "50",
            "--log", str(log_path), timeout_s=2 + GRACE_S,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert ("keys held values already" in done.stdout) == (run == "second"), done.stdout
        check = _kv("check", str(log_path), timeout_s=GRACE_S)
        assert check.stdout.startswith("OK"), check.stdout
