"""A local cluster of real node processes (used by the tests, the demo and the benchmarks).

Nodes run as ``python -m kvstore node ...`` child processes, each with its own log
file. Readiness is polled through the node's ``status`` RPC, never slept for.
Processes are stopped and killed only through the PIDs this module started.

As an operator would, a cluster creates its parent znode with ``kv-createznode`` (run with
the ZooKeeper credentials and TLS options its nodes have) before it starts any node: nodes
refuse to start without it.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvstore import errors
from kvstore.config import ZK_SESSION_TIMEOUT_S, ClientConfig, TlsConfig
from kvstore.coordination import (
    DEFAULT_REPLICAS,
    ClusterMeta,
    ClusterView,
    connect,
)
from kvstore.local.certs import CertificateFiles, tls_args, write_zk_credentials
from kvstore.local.processes import free_port, terminate, wait_until
from kvstore.rpc import Connection, client_tls_context, probe


def redacted(command: Sequence[str]) -> list[str]:
    """``command`` with the value of --zk-auth masked, for logs."""
    shown = list(command)
    for i, arg in enumerate(shown):
        if arg.startswith("--zk-auth="):
            shown[i] = "--zk-auth=***"
        elif i > 0 and shown[i - 1] == "--zk-auth":
            shown[i] = "***"
    return shown


class NodeExitedError(RuntimeError):
    """A node's process exited while it was waited for. ``summary``: one line (its address,
    exit status, its log's last line and where the log is); the message adds the log's tail."""

    def __init__(self, address: str, returncode: int, log_path: Path) -> None:
        tail = _tail(log_path, 40)
        last = tail.splitlines()[-1].strip() if tail else "(no output)"
        self.summary = f"node {address} exited with {returncode}: {last} (log: {log_path})"
        super().__init__(f"{self.summary}\n{tail}")


class NodeProcess:
    """One ``kv-node`` child process on a fixed port (kept across restarts), loopback by default.

    ``command_prefix`` runs it through another program, e.g. ``ip netns exec NS`` to start it
    inside a network namespace (bound to ``host``, an address there: give ``port`` then, as no
    free port can be looked up from here). The prefix must exec the node, keeping the PID.

    ``default_args`` (a class attribute) go before each node's own arguments, which can
    override them: the test suite's workers give their nodes a CPU each (tests/conftest.py).
    """

    default_args: tuple[str, ...] = ()

    def __init__(
        self,
        zk_connect: str,
        zk_path: str,
        log_dir: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        host: str = "127.0.0.1",
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.command_prefix = list(command_prefix)
        self.port = port or free_port(host)
        self.zk_connect = zk_connect
        self.zk_path = zk_path
        self.log_path = Path(log_dir) / f"node-{self.port}.log"
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            *self.command_prefix,
            sys.executable,
            "-m",
            "kvstore",
            "node",
            self.host,
            str(self.port),
            self.zk_connect,
            self.zk_path,
            # Its nodes share CPUs (free ports are odd, and --cpu auto picks by port: on two
            # CPUs all of them get the same one), where SCHED_BATCH stops them preempting
            # each other (BENCHMARKS.md).
            *([] if "--sched" in self.extra_args else ["--sched", "batch"]),
            *self.default_args,
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting: {' '.join(redacted(command))}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9 the process this object started."""
        if self.is_running():
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process is not None:
            terminate(self.process, timeout_s)

    def status(self, timeout_ms: int = 500) -> Any | None:
        """The node's NodeStatus, or None if it does not answer (over TLS, with the node's
        own certificate, if its arguments have --tls-cert/--tls-key/--tls-ca)."""
        try:
            return probe(self.address, timeout_ms, _tls_context(tuple(self.extra_args)))
        except errors.KVError:
            return None

    def dump(self, timeout_ms: int = 10_000) -> dict[str, str]:
        """The node's whole store (``dump``: refused unless it is the primary)."""
        conn = Connection(self.address, timeout_ms, tls=_tls_context(tuple(self.extra_args)))
        try:
            result: dict[str, str] = conn.call("dump")
            return result
        finally:
            conn.close()

    def wait_for_role(self, roles: Sequence[str], timeout_s: float = 30.0) -> Any:
        """Poll until the node reports one of ``roles``; raise with the log tail otherwise."""
        last = None

        def in_role() -> Any | None:
            nonlocal last
            self._raise_if_exited()
            last = self.status()
            return last if last is not None and last.role in roles else None

        return wait_until(
            in_role,
            timeout_s,
            lambda: (
                f"node {self.address} not {'/'.join(roles)} after {timeout_s} s "
                f"(last status: {last})\n{self.log_tail()}"
            ),
        )

    def role(self) -> str | None:
        """The role the node reports now (None: it does not answer); NodeExitedError if its
        process exited."""
        self._raise_if_exited()
        status = self.status()
        return None if status is None else str(status.role)

    def _raise_if_exited(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise NodeExitedError(self.address, self.process.returncode, self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines) or "(no log)"


def _tail(log_path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log ("" if it cannot be read)."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# The options of kv-node that kv-createznode shares (ZooKeeper credentials and TLS), which
# both read alike; written out in full (or as --option=value) in a node's arguments.
ZK_OPTIONS = ("--zk-auth", "--zk-auth-file", "--zk-tls-cert", "--zk-tls-key", "--zk-tls-ca")


def zk_options(node_args: Sequence[str]) -> list[str]:
    """The ZooKeeper credentials and TLS options among ``node_args``, with their values."""
    found: list[str] = []
    for i, arg in enumerate(node_args):
        if arg.split("=", 1)[0] in ZK_OPTIONS:
            found += node_args[i : i + (1 if "=" in arg else 2)]
    return found


def read_meta(zk_connect: str, zk_path: str, zk_tls: TlsConfig | None = None) -> ClusterMeta:
    """The metadata under ``zk_path`` as ZooKeeper holds it now (read anonymously: anyone
    may)."""
    zk = connect(zk_connect, ZK_SESSION_TIMEOUT_S, META_TIMEOUT_S, tls=zk_tls)
    try:
        return ClusterView(zk, zk_path, lambda: None).meta()[0]
    finally:
        zk.stop()
        zk.close()


def createznode(
    zk_connect: str, zk_path: str, node_args: Sequence[str] = (), replicas: int | None = None
) -> str:
    """Create the parent znode by running kv-createznode, as an operator does before starting
    the nodes: with the ZooKeeper credentials and TLS options of ``node_args`` (a node's
    arguments; $KV_ZK_AUTH is inherited like theirs) and ``--replicas`` if given. Returns its
    line (e.g. ``/kvstore: created``); an existing parent is left as it is (but for the
    replication factor). CoordinationError with its message if it fails."""
    options = [*zk_options(node_args), *([] if replicas is None else ["--replicas", str(replicas)])]
    command = [sys.executable, "-m", "kvstore", "createznode", *options, zk_connect, zk_path]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CREATE_TIMEOUT_S)
    if done.returncode != 0:
        raise errors.CoordinationError(f"kv-createznode failed: {done.stderr.strip()}")
    return done.stdout.strip()


class LocalCluster:
    """A parent znode plus ``size`` node processes; the first started is the primary."""

    def __init__(
        self,
        zk_connect: str,
        zk_path: str,
        log_dir: Path,
        size: int = 2,
        node_args: Sequence[str] = (),
        nodes: Sequence[NodeProcess] | None = None,
        client_tls: TlsConfig | None = None,
        client_zk_tls: TlsConfig | None = None,
        replicas: int | None = None,
    ) -> None:
        """``nodes``: these (e.g. each in a network namespace) instead of ``size`` new ones.
        ``client_tls``: the client certificate loads against this cluster use (and
        ``client_zk_tls`` for ZooKeeper's TLS port). ``replicas``: the replication factor
        :meth:`create_parent` creates the parent with (None: the parent's, or the default 2)."""
        self.zk_connect = zk_connect
        self.replicas = replicas
        self.zk_path = zk_path
        self.client_tls = client_tls
        self.client_zk_tls = client_zk_tls
        self.log_dir = Path(log_dir)
        self.created: str | None = None  # kv-createznode's line, once create_parent ran
        self.nodes = (
            list(nodes)
            if nodes is not None
            else [
                NodeProcess(zk_connect, zk_path, self.log_dir, extra_args=node_args)
                for _ in range(size)
            ]
        )

    def create_parent(self) -> str:
        """Create the parent znode as kv-createznode does, with the ZooKeeper options of the
        first node (:func:`createznode`); call it before starting nodes one by one
        (``start`` does). Returns kv-createznode's line."""
        self.created = createznode(
            self.zk_connect, self.zk_path, self.nodes[0].extra_args, self.replicas
        )
        return self.created

    def start(self, timeout_s: float = 30.0) -> None:
        """Create the parent (unless :meth:`create_parent` did already), start the primary,
        then the others, and wait until the backups are in sync."""
        if self.created is None:
            self.create_parent()
        first, *rest = self.nodes
        first.start()
        first.wait_for_role(["primary"], timeout_s)
        for node in rest:
            node.start()
        # Which of them become backups depends on the order they register in, not on the
        # order they were started in.
        backups = min(len(rest), (self.replicas or DEFAULT_REPLICAS) - 1)
        wait_until(
            lambda: sum(node.role() == "backup" for node in rest) >= backups or None,
            timeout_s,
            lambda: f"fewer than {backups} backups after {timeout_s} s\n{self.logs()}",
        )

    def meta(self) -> ClusterMeta:
        """The cluster metadata as ZooKeeper holds it now."""
        return read_meta(self.zk_connect, self.zk_path, self.client_zk_tls)

    def client_config(self) -> ClientConfig:
        """How a client (a load, a test) reaches this cluster."""
        return ClientConfig(
            self.zk_connect, self.zk_path, tls=self.client_tls, zk_tls=self.client_zk_tls
        )

    def find(self, role: str) -> NodeProcess | None:
        for node in self.nodes:
            status = node.status() if node.is_running() else None
            if status is not None and status.role == role:
                return node
        return None

    def wait_for(self, role: str, timeout_s: float = 30.0) -> NodeProcess:
        return wait_until(
            lambda: self.find(role),
            timeout_s,
            lambda: f"no {role} after {timeout_s} s\n{self.logs()}",
        )

    def logs(self, lines: int = 30) -> str:
        return "\n".join(f"=== {node.log_path}\n{node.log_tail(lines)}" for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


CREATE_TIMEOUT_S = 60.0
META_TIMEOUT_S = 10.0


def secure_cluster(
    zk_connect: str, zk_path: str, directory: Path, certs: CertificateFiles
) -> tuple[LocalCluster, str]:
    """A cluster (not started) secured as SECURITY.md describes, over a ZooKeeper with a TLS
    port: fresh ZooKeeper credentials in ``directory``/zk-auth (0600), the parent created
    with them by kv-createznode, nodes with the node certificate (to each other and to
    ZooKeeper) and the credentials; its loads use the client certificate. Also returns
    kv-createznode's line."""
    auth_file = directory / "zk-auth"
    write_zk_credentials(auth_file)
    zk_node_options = [*tls_args(certs.node, "--zk-tls"), "--zk-auth-file", str(auth_file)]
    cluster = LocalCluster(
        zk_connect,
        zk_path,
        directory / "nodes",
        node_args=[*certs.node_args(), *zk_node_options],
        client_tls=certs.client,
        client_zk_tls=certs.client,
    )
    return cluster, cluster.create_parent()


TLS_OPTIONS = ("--tls-cert", "--tls-key", "--tls-ca")


@functools.lru_cache(maxsize=16)
def _tls_context(node_args: tuple[str, ...]) -> Any:
    """A client TLS context from a node's --tls-* arguments (None without them)."""
    files = []
    for option in TLS_OPTIONS:
        if option not in node_args or node_args.index(option) + 1 >= len(node_args):
            return None
        files.append(node_args[node_args.index(option) + 1])
    return client_tls_context(*files)
