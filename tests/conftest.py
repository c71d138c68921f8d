"""Shared pytest fixtures: one real ZooKeeper per test session, a fresh parent path per test.

When a test that used ZooKeeper fails, the tail of the ZooKeeper log is attached
to its report (shown by pytest as a "zookeeper log" section).
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from kvstore.local.certs import write_cluster_secret
from kvstore.local.cluster import LocalCluster
from kvstore.local.zkserver import ZooKeeperServer

ZK_LOG_LINES = 60
NODE_LOG_LINES = 60


def pytest_configure(config: pytest.Config) -> None:
    """Turn SIGTERM (e.g. from `timeout`) into KeyboardInterrupt, so fixtures still stop the
    ZooKeeper and node processes they started instead of leaving them running."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    """A standalone ZooKeeper (tickTime 200 ms, sessions 0.4 to 30 s), stopped after the session."""
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def zk_path() -> str:
    """A parent znode path no other test uses (not created)."""
    return f"/kvstore-test-{uuid.uuid4().hex}"


@pytest.fixture
def idle_cluster(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    """Two node processes, none started yet (nodes create the parent path themselves);
    whatever the test started is stopped afterwards."""
    local = LocalCluster(
        zk_server.connect_string, zk_path, tmp_path_factory.mktemp("nodes"), size=2
    )
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A fresh cluster secret file (0600), for kv-node --cluster-secret-file."""
    return write_cluster_secret(tmp_path / "cluster-secret")


@pytest.fixture
def secret_cluster(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path: Path, secret_file: Path
) -> Iterator[LocalCluster]:
    """A primary and a synced backup, plaintext, sharing the cluster secret ``secret_file``."""
    local = LocalCluster(
        zk_server.connect_string,
        zk_path,
        tmp_path / "nodes",
        node_args=["--cluster-secret-file", str(secret_file)],
    )
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture
def cluster(idle_cluster: LocalCluster) -> LocalCluster:
    """Two real node processes under a fresh parent path: a primary and a synced backup."""
    idle_cluster.start()
    return idle_cluster


def _run_on_a_terminal(args: Sequence[str], timeout_s: float) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a new pseudo-terminal (a real TTY); its exit
    code and everything it wrote (the terminal turns each newline into CR LF). A process
    still running after ``timeout_s`` is killed."""
    master, slave = pty.openpty()
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not data:
                break
            chunks.append(data)
        return process.wait(timeout=30), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture
def on_a_terminal() -> Callable[[Sequence[str], float], tuple[int, str]]:
    """``on_a_terminal(args, timeout_s)``: run a program with its output on a pseudo-terminal;
    (exit code, output)."""
    return _run_on_a_terminal


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    if report.failed:
        servers = [
            value
            for value in getattr(item, "funcargs", {}).values()
            if isinstance(value, ZooKeeperServer)
        ]
        for server in servers:
            report.sections.append(
                (f"zookeeper log ({server.log_path})", server.log_tail(ZK_LOG_LINES))
            )
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, LocalCluster):
                report.sections.append(("node logs", value.logs(NODE_LOG_LINES)))
    return report
