"""The README's main job: local ZooKeeper, two nodes, kv-client, kill -9 of the primary midway.

Everything runs on loopback ports chosen free at start and lives under one work
directory (ZooKeeper data and log, node logs, execution.log). Everything started
is stopped at the end, by PID.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

from kvstore.bench import faults
from kvstore.bench.progress import maybe_progress
from kvstore.bench.workload import Workload, summary_lines
from kvstore.check import checker
from kvstore.check.history import write_events
from kvstore.local.cluster import LocalCluster
from kvstore.local.zkserver import ZooKeeperServer


def run_demo(seconds: float, threads: int, keyspace: int, workdir: str) -> int:
    root = Path(workdir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    print(f"== work directory: {root}")
    with ZooKeeperServer(root / "zookeeper") as zk:
        print(f"== ZooKeeper up at {zk.connect_string}")
        cluster = LocalCluster(
            zk.connect_string, f"/kvstore-demo-{uuid.uuid4().hex[:8]}", root / "nodes"
        )
        try:
            cluster.start()
            for node in cluster.nodes:
                status = node.status()
                print(f"== node {node.address}: {status.role if status else '?'}")
            print(
                f"== kv-client: {threads} threads, {seconds:g} s, {keyspace} keys; "
                f"kill -9 of the primary at {seconds / 2:g} s, restarted at once"
            )
            workload = Workload(threads, seconds, keyspace)
            half = seconds / 2
            progress = maybe_progress(sys.stdout, seconds)
            try:
                result, kills = faults.run_with_kills(
                    cluster, workload, "primary", (half, half), max_kills=1, progress=progress
                )
            finally:
                if progress is not None:
                    progress.done()
        finally:
            cluster.stop()
    for at_s, address in kills:
        print(f"== killed primary {address} at {at_s:.1f} s")
    for line in summary_lines(result):
        print(line)
    log_path = root / "execution.log"
    write_events(log_path, result.events)
    print(f"== kv-check {log_path}")
    verdict = checker.run_check(log_path)
    print(f"== logs: {root}")
    return verdict
