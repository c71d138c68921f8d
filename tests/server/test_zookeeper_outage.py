"""ZooKeeper is off the request path: restarting it under load causes no failover, no
failed operation, and requests keep succeeding while it is down; an outage far longer
than the nodes' sessions loses no acknowledged write and the cluster heals by itself."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import kazoo.exceptions
import kazoo.handlers.threading
import pytest
from kazoo.handlers import utils as kazoo_utils
from kazoo.handlers.threading import SequentialThreadingHandler

import kvstore
from kvstore import errors
from kvstore.bench import load
from kvstore.bench.workload import Workload
from kvstore.check import checker
from kvstore.check.history import format_event, parse_log
from kvstore.config import ClientConfig
from kvstore.coordination import connect, zookeeper_errors
from kvstore.local.cluster import LocalCluster
from kvstore.local.processes import wait_until
from kvstore.local.zkserver import ZooKeeperServer

SECONDS = 8.0
RESTART_AT_S = 3.0
LONG_OUTAGE_S = 12.0  # twelve times the nodes' session timeout below


def test_zookeeper_restart_under_load(tmp_path: Path, zk_path: str) -> None:
    with ZooKeeperServer(tmp_path / "zookeeper") as zk:
        cluster = LocalCluster(zk.connect_string, zk_path, tmp_path / "nodes", size=2)
        try:
            cluster.start()
            epoch = cluster.wait_for("primary").status().epoch
            down: list[int] = []

            def restart() -> None:
                down.append(time.monotonic_ns())
                zk.restart()
                down.append(time.monotonic_ns())

            timer = threading.Timer(RESTART_AT_S, restart)
            start_ns = time.monotonic_ns()
            result = load.run(
                Workload(4, SECONDS, 1000, seed=3),
                ClientConfig(zk.connect_string, zk_path),
                start_ns,
                on_start=timer.start,
            )
            timer.join(60)
            epoch_after = cluster.wait_for("primary").status().epoch
            cluster.wait_for("backup")
        finally:
            cluster.stop()
    lines = [format_event(*event) for event in sorted(result.events)]
    assert checker.check(parse_log(lines)).is_ok
    assert len(down) == 2, "ZooKeeper did not restart"
    assert not result.failures, result.failures
    assert epoch_after == epoch, "a failover happened"
    went_down, came_back = (t - start_ns for t in down)
    served_meanwhile = [t for t, is_response, *_ in result.events if went_down < t < came_back]
    assert served_meanwhile, "no request succeeded while ZooKeeper was down"
    print(
        f"ZooKeeper down {(came_back - went_down) / 1e9:.2f} s; longest gap between successes "
        f"{result.longest_gap_s * 1000:.1f} ms; {len(served_meanwhile)} events meanwhile"
    )


def test_an_outage_longer_than_every_session_loses_nothing(tmp_path: Path, zk_path: str) -> None:
    keys = {f"k{i}": f"v{i}" for i in range(100)}
    with ZooKeeperServer(tmp_path / "zookeeper") as zk:
        cluster = LocalCluster(
            zk.connect_string,
            zk_path,
            tmp_path / "nodes",
            size=2,
            node_args=["--session-timeout", "1"],
        )
        try:
            cluster.start()
            with kvstore.Client(zk.connect_string, zk_path, timeout=60) as kv:
                for key, value in keys.items():
                    kv.put(key, value)
                zk.stop()
                stopped = threading.Event()
                stopped.wait(LONG_OUTAGE_S)  # the outage itself: nothing to poll for
                zk.start()
                cluster.wait_for("primary", 60)
                assert kv.get_many(list(keys)) == keys
                cluster.wait_for("backup", 60)  # and it heals without a person

                def read_logs() -> dict[str, str]:
                    return {node.address: node.log_path.read_text() for node in cluster.nodes}

                wait_until(
                    lambda: all("works again" in t for t in read_logs().values()) or None,
                    10,
                    lambda: "\n".join(read_logs().values()),
                )
                logs = read_logs()
        finally:
            cluster.stop()
    # The log says what happened in plain lines: the failure once (not every few seconds,
    # not as a repr of kazoo's exception), and that it works again.
    for address, text in logs.items():
        assert "KazooTimeoutError" not in text and "Traceback" not in text, text
        assert text.count("control step failed: ") <= 4, text
        assert "control step works again" in text, f"{address}:\n{text}"


def test_a_session_handshake_without_an_answer_is_given_up_in_a_third_of_the_session() -> None:
    """A server that takes the connection but never answers the handshake (as ZooKeeper
    did once while it restarted) held kazoo's attempt for the whole session timeout divided
    by the hosts (3 s here), so the session expired before a second attempt. Now each
    attempt waits a third of it (1 s), then the next one comes."""
    with silent_server() as (port, attempts):
        with pytest.raises(errors.CoordinationError, match="cannot reach ZooKeeper"):
            connect(f"127.0.0.1:{port}", session_timeout_s=3.0, connect_timeout_s=2.5)
        assert len(attempts) >= 2, f"{len(attempts)} handshake attempts in 2.5 s"


def test_giving_up_on_zookeeper_takes_the_connect_timeout_not_the_attempt_under_way() -> None:
    """kv --timeout 5 took 7 s against a paused ZooKeeper: at the deadline, connect closed
    the client first, which waited for kazoo's attempt under way (a third of the session).
    It gives up at the deadline now (the client closes in the background)."""
    with silent_server() as (port, _):
        began = time.monotonic()
        with pytest.raises(errors.CoordinationError, match="within 1 s"):
            # (an attempt waits 3 s here: a third of the session)
            connect(f"127.0.0.1:{port}", 9.0, connect_timeout_s=1.0)
        took = time.monotonic() - began
        assert took < 2.0, f"gave up after {took:.1f} s, not at the 1 s asked for"


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A loopback port that takes connections and never answers (a ZooKeeper paused or
    restarting): yields the port and the connections it took (kept open until the end)."""
    listener = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # (closed at the end)
            for _ in range(100):  # bounded
                taken.append(listener.accept()[0])

    threading.Thread(target=accept, name="silent-zookeeper", daemon=True).start()
    try:
        yield listener.getsockname()[1], taken
    finally:
        listener.close()
        for sock in taken:
            sock.close()


def test_a_connect_to_a_zookeeper_host_is_given_a_third_of_the_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kazoo gives its TCP (and TLS) connect the whole session timeout: a host of an
    ensemble that drops packets would hold an attempt until the session expired. (A
    dropped SYN needs a network namespace to make; what kazoo is asked for is checked.)"""
    asked: list[float] = []

    def record(_module: object, *_args: object, timeout: float, **_kwargs: object) -> None:
        asked.append(timeout)
        raise OSError("not connecting in this test")

    monkeypatch.setattr(kazoo_utils, "create_tcp_connection", record)
    handler = SequentialThreadingHandler()
    for session_s in (9.0, 2.0):
        with pytest.raises(OSError):
            handler.create_connection(address=("127.0.0.1", 1), timeout=session_s)
    assert asked == [3.0, 1.0]


@pytest.mark.parametrize(
    ("failure", "is_transient"),
    [
        (kazoo.exceptions.ConnectionLoss(), True),
        (kazoo.exceptions.SessionExpiredError(), True),
        (kazoo.exceptions.ConnectionClosedError(), True),
        (kazoo.handlers.threading.KazooTimeoutError(), True),
        (kazoo.exceptions.NoAuthError(), False),
        (kazoo.exceptions.BadArgumentsError(), False),
    ],
)
def test_a_lost_connection_or_session_is_transient_an_answer_is_not(
    failure: Exception, is_transient: bool
) -> None:
    """kv-node tries its start-up steps again (check the parent, register) on a transient
    failure until the connect deadline: a node started during a ZooKeeper blip whose
    session expired on the way exited for good (fault campaign)."""
    with pytest.raises(errors.CoordinationError) as raised, zookeeper_errors("registration"):
        raise failure
    assert raised.value.is_transient == is_transient
