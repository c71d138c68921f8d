"""The README's main job: local ZooKeeper, two nodes, kv-client, kill -9 of the primary midway.

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

import subprocess
import sys
import time
import uuid
from pathlib import Path

from kvstore import errors
from kvstore.bench import faults
from kvstore.bench.progress import maybe_progress
from kvstore.bench.workload import Workload, summary_lines
from kvstore.check import checker
from kvstore.check.history import write_events
from kvstore.local.certs import (
    CertificateFiles,
    tls_args,
    write_certificates,
    write_zk_credentials,
)
from kvstore.local.cluster import LocalCluster
from kvstore.local.zkserver import ZooKeeperServer

CREATE_TIMEOUT_S = 60.0


def run_demo(
    seconds: float, threads: int, keyspace: int, workdir: str, is_secure: bool = False
) -> int:
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
            cluster = secure_cluster(zk.connect_string, path, root, certs)
        else:
            cluster = LocalCluster(zk.connect_string, path, root / "nodes")
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


def secure_cluster(zk_connect: str, path: str, root: Path, certs: CertificateFiles) -> LocalCluster:
    """ZooKeeper credentials under ``root``, the parent ``path`` created with them (over
    ZooKeeper's TLS port), and a cluster whose nodes and load use them and ``certs``."""
    auth_file = root / "zk-auth"
    write_zk_credentials(auth_file)
    command = [sys.executable, "-m", "kvstore", "createznode", "--zk-auth-file", str(auth_file)]
    command += tls_args(certs.node, "--zk-tls")
    done = subprocess.run(
        [*command, zk_connect, path], capture_output=True, text=True, timeout=CREATE_TIMEOUT_S
    )
    if done.returncode != 0:
        raise errors.CoordinationError(f"kv-createznode failed: {done.stderr.strip()}")
    print(f"== kv-createznode --zk-auth-file {auth_file}: {done.stdout.strip()}")
    print(
        f"== secure: mutual TLS 1.3 to the nodes and to ZooKeeper (CA and certificates in "
        f"{certs.directory}: nodes OU=node, the load a client certificate); {path} "
        f"writable only with the ZooKeeper credentials in {auth_file}, readable by anyone"
    )
    node_args = [*certs.node_args(), *tls_args(certs.node, "--zk-tls")]
    node_args += ["--zk-auth-file", str(auth_file)]
    return LocalCluster(
        zk_connect,
        path,
        root / "nodes",
        node_args=node_args,
        client_tls=certs.client,
        client_zk_tls=certs.client,
    )
