"""Shared pytest fixtures: one real ZooKeeper per test session, a fresh parent path per test,
and clusters: a fresh one per test (``cluster``), or one that tests share, each handed it as a
fresh one would be (``shared_cluster``, see shared_clusters.py).

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
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.zkserver import ZooKeeperServer
from shared_clusters import SharedCluster, shared_for_a_scope

ZK_LOG_LINES = 60
NODE_LOG_LINES = 60


def pytest_configure(config: pytest.Config) -> None:
    """Turn SIGTERM (e.g. from `timeout`) into KeyboardInterrupt, so fixtures still stop the
    ZooKeeper and node processes they started instead of leaving them running."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    _give_the_workers_nodes_a_cpu_each()


def _give_the_workers_nodes_a_cpu_each() -> None:
    """Under pytest-xdist (scripts/test), worker N's nodes run on CPU N (modulo the CPUs).
    kv-node's --cpu auto picks by port, and free ports are odd: on two CPUs every node of
    both workers would share CPU 1, each worker's tests slowing the other's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    allowed = sorted(os.sched_getaffinity(0))
    if worker.startswith("gw") and len(allowed) > 1 and len(allowed) == os.cpu_count():
        NodeProcess.default_args = ("--cpu", str(allowed[int(worker[2:]) % len(allowed)]))


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
    """Two node processes, none started yet, under a parent path created by kv-createznode
    (nodes refuse to start without it); whatever the test started is stopped afterwards."""
    local = LocalCluster(
        zk_server.connect_string, zk_path, tmp_path_factory.mktemp("nodes"), size=2
    )
    local.create_parent()
    try:
        yield local
    finally:
        local.stop()


class SmallFilesystems:
    """Small tmpfs mounts made by a test (to fill a node's disk), unmounted at the end."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self.mounted: list[Path] = []

    def mount(self, size_bytes: int) -> Path:
        """A new directory with a tmpfs of ``size_bytes`` on it; skips the test, with the
        reason, where mounting is not permitted."""
        path = self._base / f"tmpfs-{len(self.mounted)}"
        path.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        command = ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        self.mounted.append(path)
        return path

    @staticmethod
    def fill(directory: Path, leave_bytes: int = 0) -> Path:
        """Write a ballast file into ``directory`` until at most ``leave_bytes`` are free
        there (or nothing more fits); returns it (delete it to free the space)."""
        ballast = directory / "ballast"
        chunk = b"\0" * (64 * 1024)
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(1_000_000):  # bounded: 64 GB
                stat = os.statvfs(directory)
                room = stat.f_bavail * stat.f_frsize - leave_bytes
                if room <= 0:
                    break
                try:
                    os.write(fd, chunk[: min(room, len(chunk))])
                except OSError:  # full
                    break
        finally:
            os.close(fd)
        return ballast

    def unmount_all(self) -> None:
        for path in self.mounted:
            if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode:
                subprocess.run(["umount", "--lazy", str(path)], capture_output=True, timeout=30)
        self.mounted.clear()


@pytest.fixture
def small_filesystems(tmp_path: Path) -> Iterator[SmallFilesystems]:
    """Mount small tmpfs file systems (``.mount(size_bytes)``); unmounted afterwards. Request
    it before fixtures whose processes use them, so that it is torn down after those."""
    filesystems = SmallFilesystems(tmp_path)
    try:
        yield filesystems
    finally:
        filesystems.unmount_all()


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


@pytest.fixture(scope="session")
def _shared_plain_cluster(
    zk_server: ZooKeeperServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedCluster]:
    yield from shared_for_a_scope(
        lambda zk_path: LocalCluster(
            zk_server.connect_string, zk_path, tmp_path_factory.mktemp("shared-nodes")
        )
    )


@pytest.fixture
def shared_cluster(_shared_plain_cluster: SharedCluster) -> LocalCluster:
    """Like ``cluster`` (a primary and a synced backup, an empty store), but the same node
    processes serve every test of the session that asks for it (SharedCluster): for tests
    that leave both nodes serving in their roles."""
    return _shared_plain_cluster.hand_out()


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
