"""Bad input gets a clear error or a closed connection; the node keeps serving and loses nothing.

Every test first stores a few keys through the primary, sends one kind of bad
input (raw bytes on the port, or well-formed calls with bad arguments), then
checks with fresh connections that the primary still returns every key and that
the backup still holds as many keys. The tests share one cluster, handed to each
empty with both nodes serving (conftest's SharedCluster: one that a test broke is
replaced). Every wait is bounded.
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import thriftpy2
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.rpc import make_client
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TFramedTransportFactory

from kvstore import errors
from kvstore.config import Limits
from kvstore.idl import RequestId
from kvstore.local.cluster import LocalCluster, NodeProcess
from kvstore.local.zkserver import ZooKeeperServer
from kvstore.rpc import Connection

SOCKET_TIMEOUT_S = 5.0
CLIENT_TIMEOUT_MS = 5000
LIMITS = Limits()
ENTRIES = {"alpha": "1", "beta": "β-2", "gamma": "g" * 300, "δέλτα": "4"}

VERSION_1_CALL = 0x80010001  # binary protocol, strict: version 1, message type CALL
T_STOP, T_I64, T_STRING, T_LIST = 0, 10, 11, 15

# Tiny IDLs that lie about the service, to send well-framed calls with bad contents.
UNKNOWN_METHOD_IDL = """
service KeyValueService {
  void nosuch();
  string get(1: string key);
}
"""
WRONG_TYPES_IDL = """
service KeyValueService {
  void put(1: i32 key, 2: i32 value);
  string get(1: i32 key);
  map<string, string> dump();
}
"""
RAW_BYTES_IDL = """
service KeyValueService {
  void put(1: binary key, 2: binary value);
  binary get(1: binary key);
  map<string, string> dump();
}
"""


# --------------------------------------------------------------------------- fixtures


class Seeded:
    """A running cluster with ENTRIES stored through the primary."""

    def __init__(self, cluster: LocalCluster) -> None:
        primary, backup = cluster.find("primary"), cluster.find("backup")
        assert primary is not None and backup is not None, cluster.logs()
        self.primary: NodeProcess = primary
        self.backup: NodeProcess = backup
        self.expected = dict(ENTRIES)

    def put(self, key: str, value: str) -> None:
        conn = Connection(self.primary.address, timeout_ms=CLIENT_TIMEOUT_MS)
        try:
            conn.call("put", key, value)
        finally:
            conn.close()
        self.expected[key] = value

    def assert_intact(self) -> None:
        """A fresh connection gets every key back; both nodes hold exactly that many keys."""
        assert self.primary.is_running() and self.backup.is_running()
        conn = Connection(self.primary.address, timeout_ms=CLIENT_TIMEOUT_MS)
        try:
            for key, value in self.expected.items():
                assert conn.call("get", key) == value, key
            assert conn.call("dump") == self.expected
        finally:
            conn.close()
        for node in (self.primary, self.backup):
            status = node.status(timeout_ms=CLIENT_TIMEOUT_MS)
            assert status is not None, f"{node.address} does not answer"
            assert status.key_count == len(self.expected), (node.address, status)


@pytest.fixture
def seeded(shared_cluster: LocalCluster) -> Seeded:
    """The module's cluster (conftest's SharedCluster: empty, both nodes serving), ENTRIES
    stored through its primary."""
    state = Seeded(shared_cluster)
    for key, value in ENTRIES.items():
        state.put(key, value)
    state.assert_intact()
    return state


@pytest.fixture(scope="module")
def idl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-idl")


@pytest.fixture(scope="module")
def load_idl(idl_dir: Path) -> Iterator[Callable[[str, str], ModuleType]]:
    """thriftpy2.load a tiny IDL under a module name of our own; unregistered afterwards."""
    loaded: list[str] = []

    def _load(name: str, text: str) -> ModuleType:
        path = idl_dir / f"{name}.thrift"
        path.write_text(text)
        loaded.append(f"{name}_thrift")
        return thriftpy2.load(str(path), module_name=f"{name}_thrift")

    yield _load
    for module_name in loaded:
        sys.modules.pop(module_name, None)


@pytest.fixture
def make_thriftpy2_client() -> Iterator[Callable[[ModuleType, NodeProcess], Any]]:
    clients: list[Any] = []

    def _make(idl: ModuleType, node: NodeProcess) -> Any:
        client = make_client(
            idl.KeyValueService,
            node.host,
            node.port,
            trans_factory=TFramedTransportFactory(),
            proto_factory=TBinaryProtocolFactory(),
            timeout=CLIENT_TIMEOUT_MS,
        )
        clients.append(client)
        return client

    yield _make
    for client in clients:
        client.close()


# --------------------------------------------------------------------------- raw bytes


def raw_connect(node: NodeProcess) -> socket.socket:
    sock = socket.create_connection((node.host, node.port), timeout=SOCKET_TIMEOUT_S)
    sock.settimeout(SOCKET_TIMEOUT_S)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        if not chunk:
            pytest.fail(f"the node closed the connection after {len(received)} of {size} bytes")
        received += chunk
    return received


def wait_closed_by_peer(sock: socket.socket, timeout_s: float = SOCKET_TIMEOUT_S) -> bytes:
    """Read until the node closes the connection (EOF or reset); fail if it does not in time."""
    deadline = time.monotonic() + timeout_s
    received = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the node kept the connection open for {timeout_s} s (got {received!r})")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            continue
        if not chunk:
            return received
        received += chunk


def frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def thrift_string(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def call_header(method: str, seqid: int = 1) -> bytes:
    name = thrift_string(method.encode())
    return struct.pack("!I", VERSION_1_CALL) + name + struct.pack("!i", seqid)


def field(ttype: int, fid: int) -> bytes:
    return struct.pack("!bh", ttype, fid)


def vm_peak_kib(pid: int | None) -> int | None:
    """The process's peak virtual memory (Linux), or None where /proc is not available."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1])
    return None


def test_http_request_closes_connection(seeded: Seeded) -> None:
    with raw_connect(seeded.primary) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
        assert wait_closed_by_peer(sock) == b""
    seeded.assert_intact()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_bytes_close_connection(seeded: Seeded, seed: int) -> None:
    rng = random.Random(seed)
    garbage = rng.randbytes(512)
    frame_size = int.from_bytes(garbage[:4], "big", signed=True)
    assert not 0 < frame_size <= LIMITS.max_frame_bytes  # not a frame header by chance
    # Random bytes inside a well-formed frame: the decoder, not the frame guard, must refuse.
    body = rng.randbytes(64)
    assert body[:2] != b"\x80\x01"  # not a valid message header by chance
    for node in (seeded.primary, seeded.backup):
        for payload in (garbage, frame(body)):
            with raw_connect(node) as sock:
                sock.sendall(payload)
                wait_closed_by_peer(sock)
    seeded.assert_intact()


def test_frame_claiming_2gib_is_refused_unread(seeded: Seeded) -> None:
    peak_before = vm_peak_kib(seeded.primary.pid)
    started = time.monotonic()
    with raw_connect(seeded.primary) as sock:
        sock.sendall(b"\x7f\xff\xff\xff" + b"\x80\x01\x00\x01abcd")
        assert wait_closed_by_peer(sock) == b""
    assert time.monotonic() - started < SOCKET_TIMEOUT_S
    peak_after = vm_peak_kib(seeded.primary.pid)
    if peak_before is not None and peak_after is not None:
        grown_mib = (peak_after - peak_before) / 1024
        assert grown_mib < 1024, f"the node reserved {grown_mib:.0f} MiB for a refused frame"
    seeded.assert_intact()


@pytest.mark.parametrize("frame_size", [0, -1, -(2**31)], ids=["zero", "minus-one", "min-i32"])
def test_non_positive_frame_length_closes_connection(seeded: Seeded, frame_size: int) -> None:
    with raw_connect(seeded.primary) as sock:
        sock.sendall(struct.pack("!i", frame_size) + call_header("get"))
        assert wait_closed_by_peer(sock) == b""
    seeded.assert_intact()


def test_truncated_frame_then_close(seeded: Seeded) -> None:
    body = call_header("put") + field(T_STRING, 1) + thrift_string(b"truncated-key")
    assert len(body) > 10
    for node in (seeded.primary, seeded.backup):
        with raw_connect(node) as sock:
            sock.sendall(struct.pack("!i", 100) + body[:10])
    seeded.assert_intact()
    conn = Connection(seeded.primary.address, timeout_ms=CLIENT_TIMEOUT_MS)
    try:
        assert conn.call("get", "truncated-key") == ""
    finally:
        conn.close()


@pytest.mark.parametrize(
    "args",
    [
        # put(key=<string claiming 2 GiB>): the frame holds 3 bytes of it
        field(T_STRING, 1) + struct.pack("!i", 2**31 - 1) + b"abc",
        # put(key=<string claiming 1 MiB>): longer than the frame, within every limit
        field(T_STRING, 1) + struct.pack("!i", 2**20) + b"abc",
    ],
    ids=["string-2gib", "string-1mib"],
)
def test_length_beyond_frame_end_closes_connection(seeded: Seeded, args: bytes) -> None:
    """A message must fit in its frame: a length that runs past the frame end is malformed.

    Waiting for more frames instead lets one small request hold a connection (and a
    buffer of the claimed size) forever, past the max_frame_bytes guard.
    """
    with raw_connect(seeded.primary) as sock:
        sock.sendall(frame(call_header("put") + args))
        wait_closed_by_peer(sock)
    seeded.assert_intact()


def test_batch_count_beyond_frame_end_closes_connection(seeded: Seeded) -> None:
    args = field(T_I64, 1) + struct.pack("!q", 1)
    args += field(T_LIST, 2) + struct.pack("!bi", T_STRING, 2**31 - 1) + thrift_string(b"k")
    with raw_connect(seeded.backup) as sock:
        sock.sendall(frame(call_header("replicate_batch") + args))
        wait_closed_by_peer(sock)
    seeded.assert_intact()


def test_negative_string_length_closes_connection(seeded: Seeded) -> None:
    args = field(T_STRING, 1) + struct.pack("!i", -5) + b"abc" + bytes([T_STOP])
    with raw_connect(seeded.primary) as sock:
        sock.sendall(frame(call_header("put") + args))
        wait_closed_by_peer(sock)
    seeded.assert_intact()


# --------------------------------------------------------------------------- bad calls


def test_unknown_method_answers_and_connection_keeps_working(
    seeded: Seeded, load_idl: Callable[[str, str], ModuleType], make_thriftpy2_client: Any
) -> None:
    idl = load_idl("kvbad_unknown", UNKNOWN_METHOD_IDL)
    client = make_thriftpy2_client(idl, seeded.primary)
    for _ in range(2):
        with pytest.raises(TApplicationException) as caught:
            client.nosuch()
        assert caught.value.type == TApplicationException.UNKNOWN_METHOD
        assert client.get("alpha") == "1"  # the same connection answers the next call
    seeded.assert_intact()


def test_an_unknown_method_with_a_huge_name_gets_a_short_answer(seeded: Seeded) -> None:
    """The answer names the method only as far as errors show it: a name of a megabyte
    must not make the node write back a megabyte."""
    with raw_connect(seeded.primary) as sock:
        sock.sendall(frame(call_header("n" * 1_000_000) + bytes([T_STOP])))
        size = struct.unpack("!i", recv_exactly(sock, 4))[0]
        assert 0 < size < 1024, size
        answer = recv_exactly(sock, size)
        assert b"unknown method nnnn" in answer
        get = field(T_STRING, 1) + thrift_string(b"alpha") + bytes([T_STOP])
        sock.sendall(frame(call_header("get") + get))
        size = struct.unpack("!i", recv_exactly(sock, 4))[0]
        assert recv_exactly(sock, size).endswith(thrift_string(b"1") + bytes([T_STOP]))
    seeded.assert_intact()


def test_wrong_argument_types_are_bad_requests(
    seeded: Seeded, load_idl: Callable[[str, str], ModuleType], make_thriftpy2_client: Any
) -> None:
    idl = load_idl("kvbad_types", WRONG_TYPES_IDL)
    for method in ("put", "get"):
        client = make_thriftpy2_client(idl, seeded.primary)  # (the node closes the connection)
        with pytest.raises(TApplicationException) as caught:
            client.put(1, 2) if method == "put" else client.get(1)
        assert caught.value.type == errors.BadRequestError.code, caught.value.message
        assert "key (field 1) is of type i32, not string" in caught.value.message
    assert make_thriftpy2_client(idl, seeded.primary).dump() == seeded.expected  # nothing stored
    seeded.assert_intact()


def test_oversized_key_is_too_large(seeded: Seeded) -> None:
    conn = Connection(seeded.primary.address, timeout_ms=CLIENT_TIMEOUT_MS)
    try:
        too_long = ["k" * (LIMITS.max_key_bytes + 1), "é" * (LIMITS.max_key_bytes // 2 + 1)]
        for key in too_long:
            with pytest.raises(errors.TooLargeError):
                conn.call("put", key, "v")
            with pytest.raises(errors.TooLargeError):
                conn.call("get", key)
        assert conn.call("get", "alpha") == "1"  # the same connection keeps working
    finally:
        conn.close()
    seeded.assert_intact()
    seeded.put("k" * LIMITS.max_key_bytes, "at the limit")  # exactly the limit is accepted
    seeded.assert_intact()


def test_an_empty_key_is_a_bad_request(seeded: Seeded) -> None:
    """Every call that names a key refuses "" (the seed's client never sends one)."""
    conn = Connection(seeded.primary.address, timeout_ms=CLIENT_TIMEOUT_MS)
    request = RequestId(client_id="c", seq=1, acked_below=1)
    calls = [
        ("put", "", "v"),
        ("put_once", "", "v", request),
        ("compare_and_set", "", None, "v", request),
        ("remove", "", request),
        ("get", ""),
        ("lookup", ""),
        ("get_many", ["alpha", ""]),
    ]
    try:
        for call in calls:
            with pytest.raises(errors.BadRequestError, match="the key is empty"):
                conn.call(*call)
        assert conn.call("get", "alpha") == "1"  # the same connection keeps working
    finally:
        conn.close()
    seeded.assert_intact()  # nothing stored


def test_oversized_value_is_too_large(seeded: Seeded) -> None:
    conn = Connection(seeded.primary.address, timeout_ms=CLIENT_TIMEOUT_MS)
    try:
        for key in ("alpha", "new-key"):
            with pytest.raises(errors.TooLargeError):
                conn.call("put", key, "v" * (LIMITS.max_value_bytes + 1))
        assert conn.call("get", "alpha") == "1"
        assert conn.call("get", "new-key") == ""
    finally:
        conn.close()
    seeded.assert_intact()
    seeded.put("big", "v" * LIMITS.max_value_bytes)  # exactly the limit is accepted
    seeded.assert_intact()


def test_invalid_utf8_is_a_bad_request(
    seeded: Seeded, load_idl: Callable[[str, str], ModuleType], make_thriftpy2_client: Any
) -> None:
    idl = load_idl("kvbad_raw", RAW_BYTES_IDL)
    client = make_thriftpy2_client(idl, seeded.primary)
    bad = b"bad-\xff\xfe-\xc3"
    calls = [
        lambda: client.put(bad, b"value"),
        lambda: client.put(b"good-key", bad),
        lambda: client.get(bad),
        lambda: client.put(b"surrogate-\xed\xa0\x80", b"value"),  # UTF-8 forbids surrogates
    ]
    for call in calls:
        with pytest.raises(TApplicationException) as caught:
            call()
        assert caught.value.type == errors.BadRequestError.code, caught.value.message
        assert client.get(b"alpha") == b"1"  # the same connection keeps working
    assert client.dump() == seeded.expected
    seeded.assert_intact()


def test_idle_and_stalled_clients_do_not_block_others(seeded: Seeded) -> None:
    idle = raw_connect(seeded.primary)
    stalled = raw_connect(seeded.primary)
    try:
        stalled.sendall(struct.pack("!i", 100) + call_header("put"))  # then nothing more
        started = time.monotonic()
        for i in range(20):
            seeded.put(f"while-idle-{i}", str(i))
        seeded.assert_intact()
        assert time.monotonic() - started < SOCKET_TIMEOUT_S
    finally:
        idle.close()
        stalled.close()
    seeded.assert_intact()


# --------------------------------------------------------------------------- idle timeout


def test_idle_timeout_spares_replication_and_pooled_clients(
    zk_server: ZooKeeperServer, zk_path: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With a short idle timeout, idle client connections close but replication keeps going.

    A burst of concurrent puts makes the primary pool several replication connections; the
    heartbeats then keep only one busy. After the idle timeout has provably passed (a fresh
    connection to each node was closed for idleness), a second burst still replicates through
    the pooled connections, the backup was never dropped, and pooled client connections that
    the primary closed are reused without an error.
    """
    local = LocalCluster(
        zk_server.connect_string,
        zk_path,
        tmp_path_factory.mktemp("idle-nodes"),
        size=2,
        node_args=["--idle-timeout", "0.5"],
    )
    try:
        local.start()
        state = Seeded(local)
        for key, value in ENTRIES.items():
            state.put(key, value)
        clients = [
            Connection(state.primary.address, timeout_ms=CLIENT_TIMEOUT_MS) for _ in range(8)
        ]

        def burst(round_: int) -> None:
            def put_all(index: int) -> None:
                for i in range(10):
                    clients[index].call("put", f"burst-{round_}-{index}-{i}", str(i))
                    state.expected[f"burst-{round_}-{index}-{i}"] = str(i)

            threads = [threading.Thread(target=put_all, args=(i,)) for i in range(len(clients))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)

        try:
            burst(1)
            for node in (state.backup, state.primary):
                with raw_connect(node) as control:
                    started = time.monotonic()
                    assert wait_closed_by_peer(control) == b""
                    assert time.monotonic() - started >= 0.4
            burst(2)
        finally:
            for conn in clients:
                conn.close()
        state.assert_intact()
        assert state.backup.status(timeout_ms=CLIENT_TIMEOUT_MS).role == "backup"
        assert "dropped backup" not in state.primary.log_tail(400), local.logs()
    finally:
        local.stop()
