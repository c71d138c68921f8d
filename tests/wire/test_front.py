"""The node's event-driven front (rpc/front.py) against a real two-node cluster, in plaintext
and under mutual TLS, and the thread-per-connection server (``kv-node --io threads``) held to
the same behaviour.

Requests are sent pipelined on raw sockets (kvstore's own client sends one at a time), so
that several arrive in one round of the front: replies keep each connection's order, a
write is seen by the reads sent after it, a connection that calls a method the front does
not serve moves to a thread of its own without losing its place, and compare-and-sets of
one key that arrive together are decided one after the other (exactly one wins).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hostile_frames import encode_call, receive_exactly
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport.memory import TCyMemoryBuffer

from kvstore.idl import KeyValueService, Lookup
from kvstore.local.certs import write_certificates
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.zkserver import ZooKeeperServer
from kvstore.rpc import client_tls_context

MIB = 1 << 20
BOUND_S = 10.0
BIG_VALUE = "v" * 500_000
UNREAD_GETS = 2000  # of BIG_VALUE, pipelined and never read: 1 GB of replies
RACES = 40  # rounds of four connections racing for one key


# How the nodes serve: the event front, a thread per connection, the front under mutual TLS.
MODES = ["events", "threads", "events-tls"]
_client_tls: dict[tuple[str, int], ssl.SSLContext] = {}  # per primary address, under TLS


@pytest.fixture(scope="module", params=MODES)
def primary_node(
    request: pytest.FixtureRequest,
    zk_server: ZooKeeperServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[NodeProcess]:
    """The primary of a two-node cluster started in mode ``param``."""
    mode = request.param
    work = tmp_path_factory.mktemp(f"front-{mode}")
    node_args = ["--io", mode.split("-")[0]]
    client_tls = None
    if mode.endswith("-tls"):
        certs = write_certificates(work / "certs")
        node_args += certs.node_args()
        client = certs.client
        client_tls = client_tls_context(client.cert_path, client.key_path, client.ca_path)
    local = LocalCluster(
        zk_server.connect_string, f"/kvstore-front-{mode}", work, node_args=node_args
    )
    if client_tls is not None:
        local.client_tls = certs.client
    try:
        local.start()
        node = next(n for n in local.nodes if n.role() == "primary")
        if client_tls is not None:
            host, port = node.address.rsplit(":", 1)
            _client_tls[(host, int(port))] = client_tls
        yield node
    finally:
        local.stop()


@pytest.fixture
def primary(primary_node: NodeProcess) -> tuple[str, int]:
    host, port = primary_node.address.rsplit(":", 1)
    return host, int(port)


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=BOUND_S)
    sock.settimeout(BOUND_S)
    tls = _client_tls.get(address)
    return sock if tls is None else tls.wrap_socket(sock)


def reply(sock: socket.socket, method: str, seqid: int) -> Any:
    """The next reply frame on ``sock``, which must answer call ``seqid`` of ``method``:
    its result, or the TApplicationException the node sent."""
    size = struct.unpack("!i", receive_exactly(sock, 4))[0]
    proto = TCyBinaryProtocol(TCyMemoryBuffer(receive_exactly(sock, size)))
    name, message_type, reply_seqid = proto.read_message_begin()
    assert (name, reply_seqid) == (method, seqid), "replies out of order"
    if message_type == TMessageType.EXCEPTION:
        error = TApplicationException()
        error.read(proto)
        return error
    result = getattr(KeyValueService, f"{method}_result")()
    result.read(proto)
    return getattr(result, "success", None)


def exchange(sock: socket.socket, calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
    """Send every call in one piece, then read their replies in order."""
    sock.sendall(b"".join(encode_call(m, args, seqid) for seqid, (m, args) in enumerate(calls)))
    return [reply(sock, method, seqid) for seqid, (method, _) in enumerate(calls)]


def test_pipelined_calls_are_answered_in_order_and_see_the_writes_before_them(
    primary: tuple[str, int],
) -> None:
    with connect(primary) as sock:
        results = exchange(
            sock,
            [
                ("put", ("pipelined", "1")),
                ("get", ("pipelined",)),
                ("compare_and_set", ("pipelined", "1", "2", None)),
                ("lookup", ("pipelined",)),
                ("compare_and_set", ("pipelined", "1", "3", None)),  # no longer "1"
                ("put", ("pipelined-other", "x")),
                ("get_many", (["pipelined", "pipelined-other", "missing"],)),
                ("remove", ("pipelined", None)),
                ("get", ("pipelined",)),
                ("remove", ("pipelined", None)),
            ],
        )
    assert results == [
        None,
        "1",
        True,
        Lookup(found=True, value="2"),
        False,
        None,
        {"pipelined": "2", "pipelined-other": "x"},
        True,
        "",
        False,
    ]


def test_compare_and_sets_of_one_key_arriving_together_let_exactly_one_win(
    primary: tuple[str, int],
) -> None:
    socks = [connect(primary) for _ in range(4)]
    try:
        for race in range(RACES):
            key = f"race-{race}"
            frames = [encode_call("compare_and_set", (key, None, f"v{i}", None)) for i in range(4)]
            for sock, frame in zip(socks, frames, strict=True):
                sock.sendall(frame)
            won = [reply(sock, "compare_and_set", 1) for sock in socks]
            assert won.count(True) == 1, f"race {race}: {won}"
            assert exchange(socks[0], [("get", (key,))]) == [f"v{won.index(True)}"]
    finally:
        for sock in socks:
            sock.close()


def test_a_connection_calling_beyond_the_data_calls_keeps_its_order_and_is_served_on(
    primary: tuple[str, int],
) -> None:
    with connect(primary) as sock:
        put, status, get = exchange(
            sock, [("put", ("moved", "1")), ("status", ()), ("get", ("moved",))]
        )
        assert (put, status.role, get) == (None, "primary", "1")
        assert exchange(sock, [("put", ("moved", "2")), ("get", ("moved",))]) == [None, "2"]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_client_that_never_reads_its_replies_costs_bounded_memory_and_stalls_nobody(
    primary_node: NodeProcess, primary: tuple[str, int]
) -> None:
    """Pipelined gets of a large value, then a call served on a thread, never read: the
    node holds back what it cannot send (at most about a frame's worth) instead of
    building every reply, and serves other clients meanwhile."""
    pid = primary_node.pid
    assert pid is not None
    with connect(primary) as other:
        assert exchange(other, [("put", ("big", BIG_VALUE))]) == [None]
        before = rss_bytes(pid)
        hostile = connect(primary)
        try:
            hostile.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hostile.sendall(encode_call("get", ("big",)) * UNREAD_GETS + encode_call("status", ()))
            for round_ in range(20):  # the node works through what it can meanwhile
                assert exchange(other, [("put", ("small", str(round_))), ("get", ("small",))]) == [
                    None,
                    str(round_),
                ]
            grown = rss_bytes(pid) - before
            assert grown < 200 * MIB, f"the node grew by {grown / MIB:.0f} MiB"
        finally:
            hostile.close()
        assert exchange(other, [("get", ("small",))]) == ["19"]
