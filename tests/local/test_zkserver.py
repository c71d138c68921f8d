"""The managed ZooKeeper is a real one: ephemeral znodes, session expiry, restarts, clear errors."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient, KazooState

from kvstore.local.processes import free_port, wait_until
from kvstore.local.zkserver import (
    CLASSPATH_ENV,
    ZooKeeperServer,
    ZooKeeperServerError,
    find_zookeeper_classpath,
    is_ok,
    is_serving,
)

WAIT_S = 10.0
# Reconnect attempts at most this far apart (kazoo's default backoff grows to 60 s, so a
# restart that takes a few seconds on a loaded machine could outlast WAIT_S).
RECONNECT_MAX_DELAY_S = 1.0
# A first connect to a server that is still starting can hang for a whole session timeout
# before kazoo tries again (seen on a loaded machine): allow for a few attempts.
CONNECT_WAIT_S = 30.0

# Run in a child process: open a 1 s session, own an ephemeral znode, then idle until killed.
EPHEMERAL_OWNER = """
import sys, threading
from kazoo.client import KazooClient
zk = KazooClient(hosts=sys.argv[1], timeout=1.0)
zk.start(timeout=10)
zk.create(sys.argv[2], b"owner", ephemeral=True, makepath=True)
threading.Event().wait()
"""


def waited_s(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> float:
    """Poll ``condition`` until true; return the seconds it took (TimeoutError past timeout_s)."""
    started = time.monotonic()
    wait_until(lambda: condition() or None, timeout_s, lambda: f"not met within {timeout_s} s")
    return time.monotonic() - started


@pytest.fixture
def connect(zk_server: ZooKeeperServer) -> Iterator[Callable[..., KazooClient]]:
    """Start kazoo clients on the shared server; all are closed after the test."""
    clients: list[KazooClient] = []

    def _connect(server: ZooKeeperServer = zk_server, timeout_s: float = 10.0) -> KazooClient:
        client = KazooClient(
            hosts=server.connect_string,
            timeout=timeout_s,
            connection_retry={"max_tries": -1, "max_delay": RECONNECT_MAX_DELAY_S},
        )
        client.start(timeout=CONNECT_WAIT_S)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.stop()
        client.close()


@pytest.fixture
def own_zk_server(tmp_path: Path) -> Iterator[ZooKeeperServer]:
    """A ZooKeeper for this test alone (for restarts that must not disturb other tests)."""
    with ZooKeeperServer(tmp_path / "zookeeper") as server:
        yield server


def test_server_answers_imok_on_loopback(zk_server: ZooKeeperServer) -> None:
    assert zk_server.connect_string == f"127.0.0.1:{zk_server.port}"
    assert zk_server.pid is not None
    assert is_ok("127.0.0.1", zk_server.port)


def _answering(reply: bytes) -> tuple[socket.socket, threading.Thread]:
    """A listener on a free loopback port that answers one four-letter word with ``reply``."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(4)
            connection.sendall(reply)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize(
    ("reply", "serving"),
    [
        (b"This ZooKeeper instance is not currently serving requests\n", False),
        (b"Zookeeper version: 3.8.0\nLatency min/avg/max: 0/0.0/0\nMode: standalone\n", True),
    ],
)
def test_serving_is_what_srvr_says_not_imok(reply: bytes, serving: bool) -> None:
    listener, thread = _answering(reply)
    with listener:
        assert is_serving("127.0.0.1", listener.getsockname()[1], timeout_s=WAIT_S) is serving
        thread.join(WAIT_S)
    assert not is_serving("127.0.0.1", free_port())  # nothing listens there


def test_a_session_opened_as_start_returns_is_not_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # ruok's imok comes before the server serves: a session opened then was closed at once
    # ("ZooKeeperServer not running"), and kazoo logged "Connection dropped" (kv-demo showed it).
    caplog.set_level(logging.WARNING, logger="kazoo")
    with ZooKeeperServer(tmp_path / "zookeeper") as server:
        assert is_serving(server.host, server.port)
        client = KazooClient(hosts=server.connect_string, timeout=2.0)
        client.start(timeout=CONNECT_WAIT_S)
        client.stop()
        client.close()
    assert "Connection dropped" not in caplog.text
    assert "ZooKeeperServer not running" not in server.log_path.read_text()


def test_ephemeral_sequential_znode_lives_with_its_session(
    connect: Callable[..., KazooClient], zk_path: str
) -> None:
    owner, observer = connect(), connect()
    created = owner.create(
        f"{zk_path}/node-", b"payload", ephemeral=True, sequence=True, makepath=True
    )
    assert created.startswith(f"{zk_path}/node-")
    data, stat = observer.get(created)
    assert data == b"payload"
    assert stat.ephemeralOwner == owner.client_id[0]

    owner.stop()
    assert observer.exists(created) is None  # a clean close ends the session at once
    assert observer.get_children(zk_path) == []


def test_killed_client_loses_its_ephemeral_znode_after_its_session_times_out(
    zk_server: ZooKeeperServer, connect: Callable[..., KazooClient], zk_path: str
) -> None:
    observer = connect()
    path = f"{zk_path}/owner"
    child = subprocess.Popen(
        [sys.executable, "-c", EPHEMERAL_OWNER, zk_server.connect_string, path],
        stdin=subprocess.DEVNULL,
    )
    try:
        waited_s(lambda: observer.exists(path) is not None)
    finally:
        child.send_signal(signal.SIGKILL)  # no close: the server must expire the session
        child.wait()
    seconds_to_expiry = waited_s(lambda: observer.exists(path) is None)
    assert seconds_to_expiry < 5.0  # a 1 s session, checked every 200 ms tick


def test_restart_keeps_persistent_data_and_the_client_reconnects(
    own_zk_server: ZooKeeperServer, connect: Callable[..., KazooClient], zk_path: str
) -> None:
    client = connect(own_zk_server)
    states: list[str] = []
    client.add_listener(states.append)
    client.create(zk_path, b"durable")
    port, pid = own_zk_server.port, own_zk_server.pid

    own_zk_server.restart()

    assert own_zk_server.port == port
    assert own_zk_server.pid != pid
    waited_s(lambda: KazooState.SUSPENDED in states and client.connected, CONNECT_WAIT_S)
    assert client.get(zk_path)[0] == b"durable"


def test_start_fails_with_the_log_tail_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = ZooKeeperServer(tmp_path / "zookeeper", port=squatter.getsockname()[1])
        with pytest.raises(ZooKeeperServerError, match="exited with status") as raised:
            server.start(timeout_s=WAIT_S)
    assert "Address already in use" in str(raised.value)
    assert server.pid is None


def test_missing_jars_are_named_with_the_setup_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(CLASSPATH_ENV, raising=False)
    monkeypatch.setattr("kvstore.local.zkserver.JAR_DIR", tmp_path)
    with pytest.raises(ZooKeeperServerError, match=r"zookeeper\.jar.*scripts/setup"):
        find_zookeeper_classpath()


def test_classpath_override_is_used_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CLASSPATH_ENV, "/opt/zk/lib/*")
    assert find_zookeeper_classpath() == "/opt/zk/lib/*"


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


def test_free_port_never_hands_out_a_port_twice() -> None:
    """The kernel picks port 0's port at random among ~14,000: 500 calls without this
    process's memory of them repeat one almost surely (a 4-node test cluster once got two
    nodes on one port)."""
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
