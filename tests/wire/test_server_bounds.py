"""RpcServer under hostile and excessive input, in-process with a trivial handler (no ZooKeeper).

Malformed and mutated frames are refused or answered at once while other connections keep
being served; connections beyond the limit are refused with UNAVAILABLE; idle client
connections are closed (a pooled Connection reconnects without an unknown outcome) but the
primary's replication connections are not; a frame must arrive within its deadline; an error
setting up one connection does not stop the accept loop. Every wait is a bounded poll.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
import types
from collections.abc import Callable, Iterator

import hostile_frames
import pytest
from hostile_frames import FREEZE_REQUEST, encode_call, exchange, mutants, receive_exactly, serving
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport.memory import TCyMemoryBuffer

from kvstore import errors, rpc
from kvstore.rpc import client as rpc_client
from kvstore.rpc import server as rpc_server

BOUND_S = 5.0
GET = encode_call("get", ("k",))


def wait_until(predicate: Callable[[], bool], timeout_s: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout_s} s: {predicate}")
        time.sleep(0.005)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
    sock.settimeout(BOUND_S)
    return sock


def read_until_closed(sock: socket.socket, timeout_s: float = BOUND_S) -> bytes:
    deadline = time.monotonic() + timeout_s
    received = b""
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            pytest.fail(f"the node kept the connection open for {timeout_s} s ({received!r})")
        if not chunk:
            return received
        received += chunk


def application_error(reply: bytes) -> TApplicationException:
    proto = TCyBinaryProtocol(TCyMemoryBuffer(reply[4:]))
    _, message_type, _ = proto.read_message_begin()
    assert message_type == TMessageType.EXCEPTION
    error = TApplicationException()
    error.read(proto)
    return error


@pytest.fixture
def client_for() -> Iterator[Callable[..., rpc.Connection]]:
    made: list[rpc.Connection] = []

    def make(port: int, **options: object) -> rpc.Connection:
        conn = rpc.Connection(f"127.0.0.1:{port}", timeout_ms=int(BOUND_S * 1000), **options)  # type: ignore[arg-type]
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close()


# --------------------------------------------------------------------------- malformed input


def test_the_28_byte_request_is_refused_at_once(client_for: Callable[..., rpc.Connection]) -> None:
    with serving() as server:
        other = client_for(server.port)
        assert other.call("get", "k") == "v"
        with connect(server.port) as sock:
            started = time.monotonic()
            sock.sendall(FREEZE_REQUEST)
            assert other.call("get", "k") == "v"
            reply = read_until_closed(sock)
            elapsed = time.monotonic() - started
        error = application_error(reply)
        assert error.type == errors.BadRequestError.code
        assert "not a Thrift type" in error.message
        assert elapsed < 1.0, f"refusing took {elapsed:.3f} s"


def test_mutated_frames_are_answered_or_closed_promptly(
    client_for: Callable[..., rpc.Connection],
) -> None:
    """Thousands of mutants of valid requests; after each, another connection is served."""
    budget_s, done, worst_s = 4.0, 0, 0.0
    with serving() as server:
        other = client_for(server.port)
        started = time.monotonic()
        for frame in mutants(seed=20261130, count=3000):
            _, elapsed = exchange(server.port, frame, BOUND_S)
            assert elapsed < BOUND_S, frame.hex()
            worst_s = max(worst_s, elapsed)
            assert other.call("get", "k") == "v", frame.hex()
            done += 1
            if time.monotonic() - started > budget_s:
                break
        wait_until(lambda: server.connection_count == 1)  # every mutant's connection ended
    assert done >= 300, f"only {done} frames in {budget_s} s"
    print(f"{done} mutated frames, worst {worst_s * 1000:.1f} ms to answer or close")


# --------------------------------------------------------------------------- connection limit


def test_connections_beyond_the_limit_are_refused_unavailable(
    client_for: Callable[..., rpc.Connection],
) -> None:
    with serving(max_connections=3) as server:
        held = [connect(server.port) for _ in range(3)]
        try:
            wait_until(lambda: server.connection_count == 3)
            with connect(server.port) as extra:
                error = application_error(read_until_closed(extra))
            assert error.type == errors.UnavailableError.code
            assert "too many connections" in error.message
            with connect(server.port) as eager:  # a request already sent changes nothing
                eager.sendall(GET)
                assert application_error(read_until_closed(eager)).type == error.type
            refused = client_for(server.port)
            with pytest.raises(errors.UnavailableError) as caught:
                refused.call("get", "k")
            assert caught.value.is_definite
            held.pop().close()
            wait_until(lambda: server.connection_count == 2)
            assert refused.call("get", "k") == "v"  # the accept loop kept serving
        finally:
            for sock in held:
                sock.close()


def test_a_connection_flood_keeps_the_thread_count_bounded(
    client_for: Callable[..., rpc.Connection],
) -> None:
    limit, flood = 16, 400
    threads_before = threading.active_count()
    with serving(max_connections=limit) as server:
        most_threads = 0
        sockets: list[socket.socket] = []
        try:
            for _ in range(flood):
                sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
                most_threads = max(most_threads, threading.active_count())
                assert server.connection_count <= limit
            wait_until(lambda: server.connection_count == limit)
        finally:
            for sock in sockets:
                sock.close()
        wait_until(lambda: server.connection_count == 0)
        assert client_for(server.port).call("get", "k") == "v"
    # The accept thread, at most one thread per served connection, and nothing else.
    assert most_threads <= threads_before + 1 + limit, (threads_before, most_threads)


# --------------------------------------------------------------------------- time bounds


def test_an_idle_client_connection_is_closed_and_a_pooled_one_reconnects(
    client_for: Callable[..., rpc.Connection],
) -> None:
    with serving(idle_timeout_s=0.2) as server:
        pooled = client_for(server.port)
        assert pooled.call("get", "k") == "v"
        with connect(server.port) as raw:
            started = time.monotonic()
            assert read_until_closed(raw) == b""
            assert 0.15 < time.monotonic() - started < BOUND_S
        wait_until(lambda: server.connection_count == 0)
        assert pooled.call("get", "k") == "v"  # checked before reuse: reconnected, no error


def test_replication_connections_never_idle_out(
    client_for: Callable[..., rpc.Connection],
) -> None:
    """The primary's pool may leave a connection unused for long, and reuses it unchecked."""
    with serving(idle_timeout_s=0.2) as server:
        lines = [client_for(server.port, is_checked_before_use=False) for _ in range(2)]
        for line in lines:
            line.call("replicate_batch", 7, [], [], "join-1", [])
        sockets = [line._socket for line in lines]
        with connect(server.port) as control:  # opened last, idle for less long
            assert read_until_closed(control) == b""
        assert server.connection_count == 2
        for line, sock in zip(lines, sockets, strict=True):
            line.call("replicate_batch", 7, ["a"], ["1"], "join-1", [])
            assert line._socket is sock, "the replication connection was reopened"


@pytest.mark.parametrize("sent", [b"\x00\x00", b"\x00\x00\x00\x64" + b"\x80\x01\x00\x01"])
def test_a_frame_must_arrive_within_its_deadline(sent: bytes) -> None:
    """A slow-loris sender trickling bytes is cut off frame_deadline_s after its first byte."""
    with serving(frame_deadline_s=0.5, idle_timeout_s=60) as server, connect(server.port) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        while time.monotonic() - started < BOUND_S:
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                try:
                    if sock.recv(1) == b"":
                        break
                except ConnectionResetError:
                    break
            try:
                sock.sendall(b"\x01")  # completes the header (0x00000101) or extends the body
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("the node waited for the frame past its deadline")
        assert 0.4 < time.monotonic() - started < 3.0


def test_a_failed_setsockopt_does_not_stop_the_accept_loop(
    monkeypatch: pytest.MonkeyPatch, client_for: Callable[..., rpc.Connection]
) -> None:
    configure = rpc._configure_connection
    failures = [OSError(22, "Invalid argument (injected)")]

    def failing(sock: socket.socket, idle_timeout_s: float, deadline_s: float) -> None:
        if failures:
            raise failures.pop()
        configure(sock, idle_timeout_s, deadline_s)

    monkeypatch.setattr(rpc_server, "_configure_connection", failing)
    with serving() as server:
        with connect(server.port) as first:
            assert read_until_closed(first) == b""
        assert not failures
        assert client_for(server.port).call("get", "k") == "v"
        wait_until(lambda: server.connection_count == 1)


def test_a_long_idle_pooled_connection_is_replaced_before_reuse(
    monkeypatch: pytest.MonkeyPatch, client_for: Callable[..., rpc.Connection]
) -> None:
    """Well before the node's idle timeout, so a request never races the node's close."""
    monkeypatch.setattr(rpc_client, "REOPEN_AFTER_IDLE_S", 0.05)
    with serving() as server:
        pooled = client_for(server.port)
        assert pooled.call("get", "k") == "v"
        first = pooled._socket
        used_at = time.monotonic()
        assert pooled.call("get", "k") == "v"
        if time.monotonic() - used_at < 0.05:
            assert pooled._socket is first  # reused while fresh
        wait_until(lambda: time.monotonic() - used_at > 0.1)
        assert pooled.call("get", "k") == "v"
        assert pooled._socket is not first
        wait_until(lambda: server.connection_count == 1)


# --------------------------------------------------------------------------- shutdown


def server_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """The RpcServer threads alive now that were not alive in ``before``."""
    return [
        t
        for t in threading.enumerate()
        if t not in before and t.name in ("rpc-accept", "rpc-front", "rpc-conn") and t.is_alive()
    ]


@pytest.mark.parametrize("event_front", [True, False], ids=["front", "threads"])
def test_close_joins_the_connection_threads(
    client_for: Callable[..., rpc.Connection], event_front: bool
) -> None:
    """Idle clients, a half-sent frame and a replication line: close() returns only once
    every thread the server started has ended."""
    before = set(threading.enumerate())
    sockets: list[socket.socket] = []
    server = rpc.RpcServer(
        "127.0.0.1", 0, hostile_frames.TrivialHandler(), 1 << 20, event_front=event_front
    )
    server.start()
    try:
        for _ in range(5):
            assert client_for(server.port).call("get", "k") == "v"
        client_for(server.port, is_checked_before_use=False).call(
            "replicate_batch", 7, [], [], "join-1", []
        )
        sockets.append(connect(server.port))
        sockets[-1].sendall(GET[:7])  # a frame begun, never finished
        # The accept thread and one per connection (admitted before its thread starts);
        # with the event front, the accept and front threads and one for the replication
        # line (handed to a thread of its own at its first call).
        wait_until(
            lambda: (
                len(server_threads(before)) == (3 if event_front else 8)
                and server.connection_count == 7
            )
        )
    finally:
        running = server.close()
        for sock in sockets:
            sock.close()
    assert running == 0
    assert server_threads(before) == []


def open_descriptors() -> set[str]:
    """This process's open descriptors, less the one that listed them (closed by then)."""
    return {name for name in os.listdir("/proc/self/fd") if _target(name) is not None}


def _target(name: str) -> str | None:
    """What a descriptor refers to ("socket:[inode]"...); None once it is closed."""
    try:
        return os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        return None


@pytest.mark.parametrize("is_started", [False, True], ids=["never-started", "started"])
def test_a_closed_server_leaves_no_descriptor_open(is_started: bool) -> None:
    """The event front's epoll and wake-up pair go with the server, started or not."""
    before = open_descriptors()
    server = rpc.RpcServer("127.0.0.1", 0, hostile_frames.TrivialHandler(), 1 << 20)
    server.bind()
    if is_started:
        server.start()
    assert len(open_descriptors() - before) >= 4  # the listener, epoll, the pair
    assert server.close() == 0
    assert open_descriptors() - before == set()


class BlockingHandler(hostile_frames.TrivialHandler):
    """``get`` waits until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def get(self, key: str) -> str:
        self.entered.set()
        self.release.wait(BOUND_S)
        return "v"


def test_close_waits_for_a_running_handler_only_as_long_as_allowed(
    client_for: Callable[..., rpc.Connection],
) -> None:
    before = set(threading.enumerate())
    handler = BlockingHandler()
    server = rpc.RpcServer("127.0.0.1", 0, handler, 1 << 20)
    server.start()
    conn = client_for(server.port)

    def call() -> None:
        with contextlib.suppress(errors.KVError):  # close() cuts the line before the answer
            conn.call("get", "k")

    caller = threading.Thread(target=call)
    try:
        caller.start()
        assert handler.entered.wait(BOUND_S)
        assert server.close(join_timeout_s=0.05) == 1  # the handler's thread, still running
    finally:
        handler.release.set()
        caller.join(BOUND_S)
    wait_until(lambda: server_threads(before) == [])


class _Line:
    """A backup's line stand-in: a socket pair, ``line`` the primary's end."""

    def __init__(self) -> None:
        self.line, self.backup = socket.socketpair()

    def close(self) -> None:
        self.line.close()  # (as another thread drops a line: the front keeps its duplicate)
        self.backup.close()


class _LineDelivery:
    def __init__(self, line: socket.socket, wait_s: float) -> None:
        self.line = line
        self.deadline = time.monotonic() + wait_s

    def fileno(self) -> int:
        return self.line.fileno()

    @property
    def watch_key(self) -> object:
        return self.line

    def finish(self) -> None:
        if self.line.recv(1) != b"r":
            raise ConnectionResetError("the line broke")

    def abandon(self) -> None:
        self.line.close()


class GroupingHandler(hostile_frames.TrivialHandler):
    """Serves ``put`` in groups whose one delivery is a reply on ``line`` (see _Line);
    with ``breaks`` set, the backup closes its end instead of replying; with ``is_silent``,
    it does not reply (the delivery's deadline is 0.2 s)."""

    grouped_methods = frozenset({"put"})

    def __init__(self) -> None:
        self.current = _Line()
        self.breaks = False
        self.is_silent = False

    def prepare(self, method: str, args: list[object]) -> object:
        return types.SimpleNamespace(key=args[0])

    def begin_group(self, methods: list[str], writes: list[object]) -> object:
        if self.breaks:
            self.current.backup.close()
        elif not self.is_silent:
            self.current.backup.send(b"r")  # the backup's reply is there already
        wait_s = 0.2 if self.is_silent else BOUND_S
        deliveries = [(None, _LineDelivery(self.current.line, wait_s))]
        return types.SimpleNamespace(deliveries=deliveries, size=len(writes))

    def end_group(self, pending: types.SimpleNamespace) -> list[object]:
        try:
            for _, delivery in pending.deliveries:
                delivery.finish()
        except OSError as exc:
            return [errors.ReplicationFailedError(str(exc))] * pending.size
        return [None] * pending.size


def put_reply_type(sock: socket.socket, seqid: int) -> int:
    sock.sendall(encode_call("put", ("k", "v"), seqid))
    size = int.from_bytes(receive_exactly(sock, 4), "big")
    name, message_type, reply_seqid = TCyBinaryProtocol(
        TCyMemoryBuffer(receive_exactly(sock, size))
    ).read_message_begin()
    assert (name, reply_seqid) == ("put", seqid)
    return message_type


def test_the_front_keeps_one_watch_per_line_and_drops_it_when_the_line_goes() -> None:
    """A group arms a lasting duplicate of its line's descriptor (rpc/front.py): descriptors
    do not grow with the groups served, a line closed by another thread loses its
    duplicate once a new line comes, and a line that breaks under a group loses it at once."""
    before = open_descriptors()
    handler = GroupingHandler()
    lines = [handler.current]  # (a socket closes when it is collected: they are kept)

    def new_line() -> None:
        handler.current = _Line()
        lines.append(handler.current)

    server = rpc.RpcServer("127.0.0.1", 0, handler, 1 << 20)
    server.start()
    try:
        with connect(server.port) as sock:
            wait_until(lambda: server.connection_count == 1)
            with_line = open_descriptors()
            assert put_reply_type(sock, 1) == TMessageType.REPLY
            line = _target(str(handler.current.line.fileno()))
            (watch,) = {fd for fd in open_descriptors() - with_line if _target(fd) == line}
            for seqid in range(2, 40):
                assert put_reply_type(sock, seqid) == TMessageType.REPLY
            assert open_descriptors() == with_line | {watch}
            handler.current.close()  # dropped by another thread: gone on the next sweep
            wait_until(lambda: len(open_descriptors()) == len(with_line) - 2)
            new_line()
            assert put_reply_type(sock, 40) == TMessageType.REPLY
            assert put_reply_type(sock, 41) == TMessageType.REPLY
            assert len(open_descriptors()) == len(with_line) + 1
            handler.is_silent = True  # past its deadline the line is cut, the duplicate goes
            assert put_reply_type(sock, 42) == TMessageType.EXCEPTION
            assert len(open_descriptors()) == len(with_line) - 1  # (the backup's end: open)
            handler.is_silent = False
            new_line()
            assert put_reply_type(sock, 43) == TMessageType.REPLY
            assert len(open_descriptors()) == len(with_line) + 2
            handler.breaks = True  # its end closes (one descriptor less), and the duplicate
            assert put_reply_type(sock, 44) == TMessageType.EXCEPTION
            wait_until(lambda: len(open_descriptors()) == len(with_line))
            handler.breaks = False
            new_line()
            assert put_reply_type(sock, 45) == TMessageType.REPLY  # kept as the server stops
    finally:
        server.close()
    for line in lines:
        line.close()
    assert open_descriptors() - before == set()
