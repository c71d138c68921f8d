"""The README's main job: local ZooKeeper, two nodes (or N with ``replicas``), kv-client,
kill -9 of the primary midway (announced as it will be: none with one copy, nor in a run too
short for it, see faults.why_no_faults).

Everything runs on loopback ports chosen free at start and lives under one work
directory (ZooKeeper data and log, node logs, execution.log). Everything started
is stopped at the end, by PID.

``is_secure`` runs the same job the way SECURITY.md describes a protected cluster: throwaway
certificates (``certs/``: nodes with the node certificate, the load with the client one,
mutual TLS 1.3 throughout), ZooKeeper on a TLS port only (its own certificate; every session
shows one from the same CA), and fresh ZooKeeper digest credentials (``zk-auth``, 0600) with
which the parent znode is created (writable only with them, readable by anyone) and the
nodes run.
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
from kvstore.local.certs import write_certificates
from kvstore.local.cluster import LocalCluster, secure_cluster
from kvstore.local.zkserver import ZooKeeperServer


def run_demo(
    seconds: float,
    threads: int,
    keyspace: int,
    workdir: str,
    is_secure: bool = False,
    replicas: int = 2,
) -> int:
    """``replicas``: the replication factor, and as many nodes (the plain cluster only)."""
    root = Path(workdir).resolve() / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    print(f"== work directory: {root}")
    certs = write_certificates(root / "certs") if is_secure else None
    zk_tls = None if certs is None else certs.zookeeper
    with ZooKeeperServer(root / "zookeeper", tls=zk_tls) as zk:
        over = " (TLS only, client certificates required)" if certs else ""
        print(f"== ZooKeeper up at {zk.connect_string}{over}")
        path = f"/kvstore-demo-{uuid.uuid4().hex[:8]}"
        if certs is not None:
            cluster, created = secure_cluster(zk.connect_string, path, root, certs)
            print(f"== kv-createznode --zk-auth-file {root / 'zk-auth'}: {created}")
            print(
                "== secure: mutual TLS 1.3 to the nodes and to ZooKeeper (CA and certificates "
                f"in {certs.directory}: nodes OU=node, the load a client certificate); {path} "
                "writable only with the ZooKeeper credentials, readable by anyone"
            )
        else:
            cluster = LocalCluster(
                zk.connect_string,
                path,
                root / "nodes",
                size=replicas,
                replicas=None if replicas == 2 else replicas,
            )
            option = "" if replicas == 2 else f" --replicas {replicas}"
            created = cluster.create_parent()  # first: nodes refuse to start without it
            print(f"== kv-createznode{option}: {created}")
            if replicas != 2:
                print(f"== {replicas} nodes, {replicas} copies")
        try:
            cluster.start()
            for node in cluster.nodes:
                status = node.status()
                print(f"== node {node.address}: {status.role if status else '?'}")
            half = seconds / 2
            # Said as it will be: the killer leaves a lone copy alone, and the last seconds.
            no_kill = faults.why_no_faults(seconds, half, replicas)
            plan = (
                f"kill -9 of the primary at {half:g} s, restarted at once"
                if no_kill is None
                else f"no kill -9: {no_kill}"
            )
            print(f"== kv-client: {threads} threads, {seconds:g} s, {keyspace} keys; {plan}")
            workload = Workload(threads, seconds, keyspace)
            progress = maybe_progress(sys.stdout, seconds)
            try:
                result, kills = faults.run_with_kills(
                    cluster,
                    workload,
                    "primary",
                    (half, half),
                    max_kills=1 if no_kill is None else 0,
                    progress=progress,
                )
            finally:
                if progress is not None:
                    progress.done()
        finally:
            cluster.stop()
    for at_s, address in kills:
        print(f"== killed primary {address} at {at_s:.1f} s")
    if not kills and no_kill is None:
        by_s = seconds - faults.QUIET_END_S
        print(
            f"== no kill -9 after all: no backup was in sync before {by_s:g} s (killing the "
            "primary then would have lost the store)"
        )
    for line in summary_lines(result):
        print(line)
    log_path = root / "execution.log"
    write_events(log_path, result.events)
    print(f"== kv-check {log_path}")
    verdict = checker.run_check(log_path)
    print(f"== logs: {root}")
    return verdict
