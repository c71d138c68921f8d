"""RpcServer with mutual TLS, in-process with a trivial handler (no ZooKeeper): the time
bounds hold under TLS (handshake, idle, frame deadline), replication lines never idle out,
and the role from the certificate gates the node-only methods. Every wait is bounded."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_frames import encode_call, serving

from kvstore import errors, rpc
from kvstore.config import TlsConfig
from kvstore.local.certs import CertificateFiles, write_certificates
from kvstore.local.processes import wait_until

BOUND_S = 5.0
NODE_ONLY = ("replicate_batch", "join")


def context(tls: TlsConfig, server: bool = False) -> ssl.SSLContext:
    make = rpc.server_tls_context if server else rpc.client_tls_context
    return make(tls.cert_path, tls.key_path, tls.ca_path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return write_certificates(Path(tmp_path_factory.mktemp("certs")))


@pytest.fixture
def connections() -> Iterator[list[rpc.Connection]]:
    made: list[rpc.Connection] = []
    yield made
    for conn in made:
        conn.close()


def connect(
    port: int, tls: ssl.SSLContext | None, made: list[rpc.Connection], **options: object
) -> rpc.Connection:
    conn = rpc.Connection(f"127.0.0.1:{port}", timeout_ms=int(BOUND_S * 1000), tls=tls, **options)  # type: ignore[arg-type]
    made.append(conn)
    return conn


def closed_after(sock: socket.socket, timeout_s: float = BOUND_S) -> float:
    """Seconds until the server closes ``sock`` (fails past ``timeout_s``)."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {timeout_s} s")
    return time.monotonic() - started


def test_a_silent_peer_is_cut_at_the_frame_deadline_and_stalls_nobody(
    certs: CertificateFiles, connections: list[rpc.Connection]
) -> None:
    tls = context(certs.node, server=True)
    with (
        serving(tls=tls, frame_deadline_s=0.5, idle_timeout_s=60) as server,
        socket.create_connection(("127.0.0.1", server.port)) as silent,
    ):
        client = connect(server.port, context(certs.client), connections)
        started = time.monotonic()
        assert client.call("get", "k") == "v"
        assert time.monotonic() - started < 0.4  # served before the silent one is cut
        assert 0.4 < closed_after(silent) < 3.0


def test_an_idle_tls_connection_is_closed_and_a_pooled_one_reconnects(
    certs: CertificateFiles, connections: list[rpc.Connection]
) -> None:
    with serving(tls=context(certs.node, server=True), idle_timeout_s=0.2) as server:
        pooled = connect(server.port, context(certs.client), connections)
        assert pooled.call("get", "k") == "v"
        raw = socket.create_connection(("127.0.0.1", server.port))
        with context(certs.client).wrap_socket(raw) as idle:
            assert 0.15 < closed_after(idle) < BOUND_S
        wait_until(
            lambda: server.connection_count == 0 or None,
            BOUND_S,
            lambda: f"{server.connection_count} connections still open",
        )
        assert pooled.call("get", "k") == "v"  # checked before reuse: reconnected, no error


def test_a_frame_must_arrive_within_its_deadline_under_tls(certs: CertificateFiles) -> None:
    with serving(tls=context(certs.node, server=True), frame_deadline_s=0.5) as server:
        raw = socket.create_connection(("127.0.0.1", server.port))
        with context(certs.client).wrap_socket(raw) as sock:
            sock.sendall(b"\x00\x00\x00\x64\x80\x01")  # a 100-byte frame, 2 bytes of it
            assert 0.4 < closed_after(sock) < 3.0


def test_a_tls_record_must_arrive_whole_within_the_frame_deadline(certs: CertificateFiles) -> None:
    """A request sent as one TLS record minus its last byte: the TLS layer holds what came,
    and the connection is cut at the frame deadline all the same (not at the idle timeout)."""
    with serving(
        tls=context(certs.node, server=True), frame_deadline_s=0.5, idle_timeout_s=60
    ) as server:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND_S)
        with raw:
            received, sent = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context(certs.client).wrap_bio(received, sent)
            for _ in range(20):  # a handshake takes a few exchanges
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(sent.read())
                    received.write(raw.recv(65536))
            raw.sendall(sent.read())
            tls.write(encode_call("get", ("k",)))
            record = sent.read()
            raw.sendall(record[:-1])
            assert 0.4 < closed_after(raw) < 3.0


def test_node_only_methods_need_a_node_certificate(
    certs: CertificateFiles, connections: list[rpc.Connection]
) -> None:
    tls = context(certs.node, server=True)
    with serving(tls=tls, idle_timeout_s=0.2, node_only_methods=NODE_ONLY) as server:
        as_client = connect(server.port, context(certs.client), connections)
        with pytest.raises(errors.ForbiddenError):
            as_client.call("replicate_batch", 7, [], [], "join-1", [])
        assert as_client.call("get", "k") == "v"
        line = connect(server.port, context(certs.node), connections, is_checked_before_use=False)
        line.call("replicate_batch", 7, [], [], "join-1", [])
        sock = line._socket
        time.sleep(0.5)  # past the idle timeout: a replication line stays open
        line.call("replicate_batch", 7, ["a"], ["1"], "join-1", [])
        assert line._socket is sock, "the replication connection was reopened"


def test_plaintext_and_anonymous_peers_are_refused(
    certs: CertificateFiles, connections: list[rpc.Connection]
) -> None:
    with serving(tls=context(certs.node, server=True)) as server:
        with pytest.raises(errors.KVError):
            connect(server.port, None, connections).call("get", "k")
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.check_hostname = False
        anonymous.load_verify_locations(str(certs.ca_cert))
        with pytest.raises(errors.KVError):
            connect(server.port, anonymous, connections).call("get", "k")
        assert connect(server.port, context(certs.client), connections).call("get", "k") == "v"


@pytest.mark.parametrize("first_bytes", [b"", b"\x16"], ids=["silent", "hello-then-silent"])
def test_silent_connections_park_at_most_max_handshakes_threads(
    certs: CertificateFiles,
    connections: list[rpc.Connection],
    first_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each TLS connection waits for its handshake on a thread: past MAX_HANDSHAKES a new
    connection cuts the oldest handshake instead of parking one more thread (a thousand
    that woke together at their deadline cost a primary its lease). A flood of silent
    connections so cuts its own: a real client's handshake gets through meanwhile, and
    connections already served go on. (A connection that sent the first byte of a TLS
    handshake is wrapped: cutting it killed its thread with an AttributeError, leaving a
    thread object behind per cut.)"""
    died: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    tls = context(certs.node, server=True)
    with serving(tls=tls, frame_deadline_s=60, idle_timeout_s=60) as server:
        served = connect(server.port, context(certs.client), connections)
        assert served.call("get", "k") == "v"
        threads_before = threading.active_count()
        silent = [
            socket.create_connection(("127.0.0.1", server.port))
            for _ in range(rpc.server.MAX_HANDSHAKES)
        ]
        for sock in silent:
            sock.sendall(first_bytes)
        try:
            wait_until(  # (every one admitted, its handshake under way)
                lambda: len(server._handshaking) >= len(silent) or None,
                BOUND_S,
                lambda: f"{len(server._handshaking)} handshakes under way",
            )
            silent.append(socket.create_connection(("127.0.0.1", server.port)))
            assert closed_after(silent[0]) < 2.0  # the oldest, not at the frame deadline
            newcomer = connect(server.port, context(certs.client), connections)
            assert newcomer.call("get", "k") == "v"  # (its handshake cut the next oldest)
            assert closed_after(silent[1]) < 2.0
            assert threading.active_count() <= threads_before + rpc.server.MAX_HANDSHAKES + 1
            started = time.monotonic()
            assert served.call("get", "k") == "v"
            assert time.monotonic() - started < 1.0
        finally:
            for sock in silent:
                sock.close()
        # (the silent ones' threads see EOF and end, each forgotten by the server)
        wait_until(
            lambda: threading.active_count() <= threads_before or None,
            BOUND_S,
            lambda: f"{threading.active_count() - threads_before} handshake threads left",
        )
        assert not died, [str(hook.exc_value) for hook in died]
        wait_until(  # (the accept and front threads; a connection thread forgets itself)
            lambda: len(server._threads) <= 2 or None,
            BOUND_S,
            lambda: f"the server still holds {len(server._threads)} threads",
        )
