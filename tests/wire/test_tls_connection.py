"""rpc.Connection under TLS against a bare TLS peer on loopback (real certificates): a reply
that comes in pieces, a silent peer, a peer that closes, each classed as test_connection.py
classes them in plaintext (a TLS read is not bounded by the kernel's timeout, see rpc/tls.py)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from thriftpy2.protocol.cybin import TCyBinaryProtocol  # type: ignore[attr-defined]
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import TMemoryBuffer

from kvstore import errors
from kvstore.idl import KeyValueService
from kvstore.local.certs import CertificateFiles, write_certificates
from kvstore.rpc import Connection, client_tls_context, server_tls_context

TIMEOUT_MS = 400


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return write_certificates(tmp_path_factory.mktemp("certs"))


def _put_reply(seqid: int) -> bytes:
    """A framed reply to ``put`` (void), as a node writes it."""
    buffer = TMemoryBuffer()
    proto = TCyBinaryProtocol(buffer)
    proto.write_message_begin("put", TMessageType.REPLY, seqid)
    KeyValueService.put_result().write(proto)
    proto.write_message_end()
    proto.trans.flush()
    body = buffer.getvalue()
    return struct.pack("!i", len(body)) + body


def _read_frame(tls: ssl.SSLSocket) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack("!i", data[:4])[0]:
        chunk = tls.recv(65536)
        if not chunk:
            raise EOFError
        data += chunk
    return data


Peer = Callable[[ssl.SSLSocket], None]


@pytest.fixture
def tls_peer(certs: CertificateFiles) -> Iterator[Callable[[Peer], str]]:
    """Start a one-connection TLS server that completes the handshake with the node
    certificate and hands the connection to ``serve``; its address."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(serve: Peer) -> str:
        node = certs.node
        context = server_tls_context(node.cert_path, node.key_path, node.ca_path)
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def run() -> None:
            raw, _ = listener.accept()
            raw.settimeout(10)
            with raw, contextlib.suppress(OSError, EOFError):  # (the client went first)
                serve(context.wrap_socket(raw, server_side=True))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return f"127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(timeout=10)


def _client(certs: CertificateFiles, address: str) -> Connection:
    tls = certs.client
    context = client_tls_context(tls.cert_path, tls.key_path, tls.ca_path)
    return Connection(address, timeout_ms=TIMEOUT_MS, tls=context)


def test_a_reply_in_two_records_and_two_segments_is_read_whole(
    certs: CertificateFiles, tls_peer: Callable[[Peer], str]
) -> None:
    """Each reply in two records, each in a segment of its own: the client's first read
    returns three bytes, not even the frame's length, and it reads on for the rest."""
    done = threading.Event()

    def serve(tls: ssl.SSLSocket) -> None:
        for _ in range(2):
            request = _read_frame(tls)
            seqid = struct.unpack_from("!i", request, 4 + 4 + 4 + len("put"))[0]
            reply = _put_reply(seqid)
            tls.sendall(reply[:3])  # a record of three bytes: not even the frame's length
            time.sleep(0.05)  # (so that the rest comes later, in a segment of its own)
            tls.sendall(reply[3:])
        done.wait(10)  # the connection stays open until the client has read both replies

    conn = _client(certs, tls_peer(serve))
    try:
        assert conn.call("put", "k", "v") is None
        assert conn.call("put", "k", "w") is None  # (the next request on the same connection)
    finally:
        done.set()
        conn.close()


def test_a_silent_tls_peer_times_out_as_an_unknown_outcome(
    certs: CertificateFiles, tls_peer: Callable[[Peer], str]
) -> None:
    stop = threading.Event()

    def serve(tls: ssl.SSLSocket) -> None:
        _read_frame(tls)
        stop.wait(10)  # never answers

    conn = _client(certs, tls_peer(serve))
    began = time.monotonic()
    try:
        with pytest.raises(errors.ConnectionLostError) as caught:
            conn.call("put", "k", "v")
    finally:
        stop.set()
    took = time.monotonic() - began
    assert not caught.value.is_definite, "the request was sent: its outcome is unknown"
    assert str(caught.value).endswith("no reply in time"), caught.value
    assert TIMEOUT_MS / 1000 * 0.9 <= took < 5, took


@pytest.mark.parametrize("goodbye", [True, False], ids=["close_notify", "bare close"])
def test_a_tls_peer_that_closes_is_a_lost_connection(
    certs: CertificateFiles, tls_peer: Callable[[Peer], str], goodbye: bool
) -> None:
    def serve(tls: ssl.SSLSocket) -> None:
        _read_frame(tls)
        if goodbye:
            tls.unwrap().close()  # TLS's close_notify, then FIN
        else:
            socket.socket.shutdown(tls, socket.SHUT_RDWR)  # FIN without close_notify

    conn = _client(certs, tls_peer(serve))
    with pytest.raises(errors.ConnectionLostError) as caught:
        conn.call("put", "k", "v")
    assert not caught.value.is_definite
    assert "the other side closed the connection" in str(caught.value), caught.value
