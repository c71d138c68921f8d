"""The event-driven front of the RPC server: one thread serves the clients' data calls.

With a thread per connection every request costs thread hand-offs: the connection's thread
wakes for the request and waits for the global interpreter lock, a write waits for the
thread that sends its batch to the backup, and each wake-up is a futex call and a context
switch. Here one thread polls every client connection (epoll; under TLS once the handshake,
done on a thread of its own, is over) and serves, in rounds:

- reads (``inline_methods``: get, lookup, get_many) at once, on this thread;
- writes (the handler's ``grouped_methods``) in *groups* of writes to distinct keys (a write
  to a key already in the newest group starts another). One group is in flight at a time:
  ``begin_group`` logs its writes and sends each backup one batch without waiting, the
  backups' lines (duplicated descriptors: another thread may close a line) are polled
  beside the clients, and once every one is readable ``end_group`` reads the replies,
  applies the writes and answers them; the groups gathered meanwhile go next. What lasts
  behind a delivery's descriptor (its ``watch_key``: the line's socket, the log's or a
  sender's eventfd) keeps its duplicate registered from group to group, armed once per group
  (EPOLLONESHOT), so a group costs one epoll call per line, not four system calls. A connection
  with a write in a group is not served further until it is answered, so its replies keep
  the order of its requests;
- anything else (replication, joins, state transfer, authentication, status, dump...) by
  handing the connection, with the bytes it sent and the replies it is owed, to a thread of
  its own (``RpcServer._serve``), as every connection is served without the front.

The handler's model is unchanged: the striped locks, the replication and the checks are
the node's; only the I/O in front of it is different. Bounds are the server's: a frame's
header is checked before its body is received, a frame must arrive within the frame
deadline of its first byte and a reply must drain within as long, an idle connection is
closed after the idle timeout, and every request is checked (framecheck) before it is
decoded. A connection that sends faster than it reads its replies is served no further
while about a frame's worth of replies waits for it (LARGE_REPLY_BYTES' worth while the node
is over its reply budget, rpc/budget.py). The replies the front holds are counted in the
budget: ``ReplyBudget.front_bytes`` is the sum of the connections' ``held_bytes``, each its
outbox's size when last counted (``_count``): a large reply as it is appended, a pass of
``_serve_frames`` that left more than LARGE_REPLY_BYTES, what a send left (nothing once all
is sent); released as the connection is closed or handed to a thread. So what it does not
count yet is small and sent (or counted) at the end of the round, and replies that wait for
their client are counted exactly. A large inline reply produced while the node is over its
budget is replaced by UNAVAILABLE. Inline methods must keep no
per-connection state in a threading.local (the server's ``on_disconnect`` hook is not
called for connections served here, and ``peer_identity`` is not set on this thread).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import time
from collections import deque
from typing import Any, NamedTuple, Protocol

from thriftpy2.protocol.cybin import TCyBinaryProtocol  # type: ignore[attr-defined]
from thriftpy2.transport.framed import TCyFramedTransport

from kvstore import errors
from kvstore.rpc.budget import LARGE_REPLY_BYTES, ReplyBudget
from kvstore.rpc.framecheck import (
    _I32,
    HAND_PARSED_READS,
    MalformedFrameError,
    MalformedRequestError,
    _exception_frame,
    bad_request_log,
    check_request,
    frame_size_error,
    parse_usual_call,
    read_reply,
)
from kvstore.rpc.secret import PeerRole

log = logging.getLogger(__name__)

INLINE_METHODS = frozenset({"get", "lookup", "get_many"})
RECEIVE_BYTES = 1 << 16
_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_REPLY = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
_BROKEN = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
WATCHES_KEPT = 16  # lasting duplicates kept registered at most (a few per backup, one log)


class Handover(NamedTuple):
    """A connection the front hands to a thread: the bytes it received and did not serve,
    the replies it did not send, and (TLS) the peer's (is_node, identity)."""

    pending: bytes
    owed: bytes
    secured: tuple[bool, str | None] | None


class GroupedWrites(Protocol):
    """What a handler offers the front to serve writes in groups."""

    grouped_methods: frozenset[str]

    def prepare(self, method: str, args: list[Any]) -> Any:
        """The checked write of a call (with a ``key`` attribute); raises KVError."""

    def begin_group(self, methods: list[str], writes: list[Any]) -> Any:
        """Start writes to distinct keys; returns the pending group, whose ``deliveries``
        (``fileno``, ``deadline``, ``abandon``, ``watch_key``) are replies to wait for
        before ``end_group``. A ``watch_key`` is an object (a socket object) with the same
        open file behind its ``fileno`` for as long as it lives, and a ``fileno`` of -1 once
        that is closed (None: closed already): the front keeps watching a duplicate of it,
        closed on its next sweep after that (so a socket should be shut down before it is
        closed: the duplicate holds the file open until then)."""

    def end_group(self, pending: Any) -> list[Any]:
        """Finish a group: each call's result, or the exception failing it."""


class Frames:
    """The transport facade a connection's TCyFramedTransport reads one frame from and
    writes its replies to: ``frame`` (length header included) is handed out piece by piece,
    never past its end; replies are appended to ``outbox``."""

    __slots__ = ("frame", "outbox")

    def __init__(self) -> None:
        self.frame = b""
        self.outbox = bytearray()

    def read(self, size: int) -> bytes:
        frame = self.frame
        if len(frame) <= size:
            if not frame:
                raise MalformedFrameError("message runs past the end of its frame")
            self.frame = b""
            return frame
        self.frame = frame[size:]
        return frame[:size]

    def write(self, data: bytes) -> None:
        self.outbox += data

    def flush(self) -> None:
        pass

    def is_open(self) -> bool:
        return True


def codec(frames: Frames) -> Any:
    """A connection's protocol over ``frames``. Its buffers grow to the largest frame it
    read or wrote and never shrink: after a large frame it is replaced by a new one, or every
    connection would keep the largest request and reply it ever had until it closes."""
    return TCyBinaryProtocol(TCyFramedTransport(frames))


class _Connection:
    __slots__ = (
        "fd",
        "frames",
        "held_bytes",
        "inbox",
        "is_closed",
        "is_waiting",
        "last_active",
        "mask",
        "partial_since",
        "peer",
        "peer_closed",
        "proto",
        "receive",
        "role",
        "secured",
        "send",
        "since",
        "sock",
        "tls",
    )

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        role: PeerRole,
        now: float,
        secured: tuple[bool, str | None] | None,
    ) -> None:
        self.sock = sock
        self.secured = secured  # TLS: (is_node, identity) from its handshake
        # TLS: the socket's SSL object, called directly (the SSLSocket methods around it
        # cost three Python calls per request); None for plaintext or another implementation.
        self.tls = getattr(sock, "_sslobj", None) if secured is not None else None
        self.receive = sock.recv if self.tls is None else self.tls.read
        self.send = sock.send if self.tls is None else self.tls.write
        self.fd = sock.fileno()
        self.peer = peer
        self.role = role
        self.frames = Frames()
        self.held_bytes = 0  # of its outbox, counted in the reply budget
        self.proto = codec(self.frames)
        self.inbox = bytearray()
        self.is_waiting = False  # a write of it is in the group, not answered yet
        self.is_closed = False
        self.peer_closed = False  # EOF: serve what it sent, then close
        self.last_active = now
        self.since = 0.0  # when its incomplete frame, or its unsent replies, began
        self.partial_since = 0.0  # TLS: when a record began that is not whole yet
        self.mask = _IN


_Entry = tuple[_Connection, str, int, Any]  # a write in a group: its call and checked write


class EventFront:
    """The front's thread and its connections (see the module's docstring)."""

    def __init__(self, server: Any, handler: object, inline_methods: frozenset[str]) -> None:
        """``server``: the RpcServer (its bounds, dispatcher and connection accounting)."""
        self._server = server
        self._dispatcher = server._dispatcher
        self._budget: ReplyBudget = server._reply_budget
        # What a connection may owe before it is served no further (``_bound_outboxes``).
        self._outbox_bound: int = server._max_frame_bytes
        grouped = getattr(handler, "grouped_methods", None)
        if not isinstance(grouped, frozenset):
            grouped = frozenset()  # (a handler that answers any attribute offers none)
        self._grouped: GroupedWrites | None = handler if grouped else None  # type: ignore[assignment]
        self._grouped_methods: frozenset[str] = grouped
        self._inline = inline_methods - grouped
        # The reads framecheck.parse_usual_call parses by hand (answered by _answer_read).
        self._hand_parsed_reads = frozenset(
            api for api in HAND_PARSED_READS & self._inline if self._dispatcher.is_open_to_all(api)
        )
        self._needs_secret = server._needs_secret
        self._poller = select.epoll()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._poller.register(self._wake_in.fileno(), select.EPOLLIN)
        self._arrivals: deque[tuple[socket.socket, str, tuple[bool, str | None] | None]] = deque()
        self._connections: dict[int, _Connection] = {}
        self._ready: list[_Connection] = []  # a whole frame may wait in its inbox
        # Groups of writes not started yet, oldest first; the newest one takes new writes
        # (unless one to one of its keys comes) until it starts.
        self._groups: deque[list[_Entry]] = deque()
        self._newest_keys: set[str] = set()
        # The group whose backups' replies are awaited (one at a time), and their lines.
        self._in_flight: tuple[list[_Entry], Any] | None = None
        self._awaited: dict[int, Any] = {}  # a line's file descriptor: its delivery
        # Lasting duplicates (see the module's docstring): watch_key -> descriptor.
        self._watches: dict[Any, int] = {}
        self._outgoing: list[_Connection] = []  # replies appended this round
        self._is_closed = False
        self.has_thread = False  # set by the server just before it starts run's thread

    # ----------------------------------------------------------------- other threads

    def add(
        self, sock: socket.socket, peer: str, secured: tuple[bool, str | None] | None = None
    ) -> None:
        """Serve ``sock`` (admitted and configured by the server's accept thread; under TLS
        after its handshake, ``secured`` being the peer's (is_node, identity))."""
        self._arrivals.append((sock, peer, secured))
        if self._is_closed:  # stopped meanwhile: nobody else closes what is left
            self._drop_arrivals()
        else:
            self.wake()

    def _drop_arrivals(self) -> None:
        while True:
            try:
                sock, _, _ = self._arrivals.popleft()
            except IndexError:
                return
            self._server._forget_connection(sock)
            sock.close()

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            self._wake_out.send(b"\0")

    def close(self) -> None:
        self._is_closed = True
        if self.has_thread:
            self.wake()  # its thread releases everything as it ends
        else:
            self._release()

    # ----------------------------------------------------------------- the thread

    def run(self) -> None:
        try:
            self._loop()
        finally:
            if self._in_flight is not None:  # release its stripe locks: the node stops
                for fd, delivery in self._awaited.items():
                    self._unwatch(fd)
                    delivery.abandon()
                self._awaited.clear()
                self._end_group()  # (the groups not begun are never begun)
            for conn in list(self._connections.values()):
                self._close(conn)
            self._release()

    def _release(self) -> None:
        self._drop_arrivals()
        for fd in list(self._watches.values()):
            self._unwatch(fd)
        self._poller.close()
        self._wake_in.close()
        self._wake_out.close()

    def _loop(self) -> None:
        server = self._server
        tick_s = min(0.25, server._frame_deadline_s / 4, server._idle_timeout_s / 4)
        next_sweep = time.monotonic() + tick_s
        connections = self._connections
        wake_fd = self._wake_in.fileno()
        failed_at = 0.0
        while not self._is_closed:
            events = self._poller.poll(0 if self._ready else tick_s)
            now = time.monotonic()
            try:
                for fd, mask in events:
                    if fd == wake_fd:
                        self._on_wake(now)
                    elif fd in connections:
                        self._on_event(connections[fd], mask, now)
                    else:
                        self._on_reply(fd, mask)
                ready, self._ready = self._ready, []
                self._bound_outboxes()  # (connection threads may have changed the budget)
                for conn in ready:
                    if not conn.is_closed and not conn.is_waiting and conn.mask != _OUT:
                        self._serve_frames(conn)
                self._advance()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + tick_s
                outgoing, self._outgoing = self._outgoing, []
                for conn in outgoing:
                    if not conn.is_closed:
                        self._send(conn, now)
            except Exception:  # a bug: log it (at most once a second) and serve on
                if now - failed_at >= 1.0:
                    log.exception("the event front failed a round; serving on")
                    failed_at = now

    def _on_event(self, conn: _Connection, mask: int, now: float) -> None:
        if mask & (select.EPOLLHUP | select.EPOLLERR):  # reset, or closed both ways
            self._close(conn)  # (a write of it still in a group is answered to nobody)
            return
        if mask & _OUT:
            self._send(conn, now)
        if mask & (select.EPOLLIN | select.EPOLLRDHUP):
            self._receive(conn, now)

    def _on_wake(self, now: float) -> None:
        with contextlib.suppress(OSError):
            while self._wake_in.recv(4096):
                pass
        while self._arrivals:
            sock, peer, secured = self._arrivals.popleft()
            try:
                sock.setblocking(False)
                is_node = True if secured is None else secured[0]
                role = PeerRole(is_node, self._needs_secret, peer)
                conn = _Connection(sock, peer, role, now, secured)
                self._poller.register(conn.fd, _IN)
            except (OSError, ValueError) as exc:
                log.warning("could not serve a connection from %s: %s", peer, exc)
                self._server._forget_connection(sock)
                sock.close()
                continue
            self._connections[conn.fd] = conn

    def _receive(self, conn: _Connection, now: float) -> None:
        if conn.is_closed or conn.mask != _IN:
            return
        try:
            data = conn.receive(RECEIVE_BYTES)
            if conn.secured is not None and data:
                data += _drain(conn)  # decrypted bytes the socket no longer signals
        except ssl.SSLEOFError:  # closed without TLS's goodbye: EOF all the same
            data = b""
        except _NOT_NOW:
            if conn.secured is not None and not conn.partial_since:
                conn.partial_since = now  # a TLS record begun: the frame deadline runs
            return
        except OSError:
            self._close(conn)
            return
        conn.partial_since = 0.0
        if not data:
            self._stop_reading(conn)
        elif not conn.inbox:
            conn.inbox += data
            conn.since = now
        else:
            conn.inbox += data
        conn.last_active = now
        if conn.is_waiting and len(conn.inbox) > self._server._max_frame_bytes + 4:
            self._watch(conn, 0)  # read on once its write is answered
        self._ready.append(conn)

    def _stop_reading(self, conn: _Connection) -> None:
        """After EOF, or a request that ends the connection: read nothing more from it,
        serve the whole frames it sent, send what it is owed, then close it."""
        conn.peer_closed = True
        if conn.mask == _IN:
            self._watch(conn, 0)

    def _serve_frames(self, conn: _Connection) -> None:
        """Serve the whole frames in ``conn``'s inbox, up to its first write, while the
        replies it owes stay under the outbox bound (the rest once they are sent): a frame,
        or LARGE_REPLY_BYTES while the node is over its reply budget."""
        outbox_bound = self._outbox_bound
        outbox = conn.frames.outbox
        try:
            while len(outbox) < outbox_bound:
                frame = self._next_frame(conn)
                if frame is None:
                    break
                # A put_once, put, get or lookup is checked and decoded at once.
                parsed = parse_usual_call(frame)
                if parsed is not None and parsed[0] in self._grouped_methods:
                    self._join_group(conn, *parsed)
                elif parsed is not None and parsed[0] in self._hand_parsed_reads:
                    self._answer_read(conn, parsed[0], parsed[1], parsed[2][0])
                else:
                    check_request(frame)
                    if not self._serve_frame(conn, frame):
                        return  # handed to a thread
                if conn.is_waiting:
                    break  # its next frame once the group answered it
            if len(outbox) > LARGE_REPLY_BYTES:
                self._count(conn)  # (less is counted once it is left unsent)
            if conn.peer_closed and not conn.is_waiting:
                self._finish(conn)
        except MalformedRequestError as exc:
            bad_request_log.warning(
                log, "refused a malformed %r request from %s: %s", exc.method, conn.peer, exc
            )
            reply = _exception_frame(
                exc.method, exc.seqid, errors.BadRequestError.code, f"malformed request: {exc}"
            )
            outbox += reply
            conn.inbox.clear()
            self._finish(conn)
        except MalformedFrameError as exc:
            bad_request_log.warning(log, "closing the connection from %s: %s", conn.peer, exc)
            if exc.answer:  # (a few bytes into an empty buffer: never blocks)
                with contextlib.suppress(OSError):
                    conn.sock.send(exc.answer)
            self._close(conn)
        except Exception as exc:  # a request the decoder refused despite the check
            bad_request_log.warning(
                log, "closing the connection from %s after a bad request: %r", conn.peer, exc
            )
            self._close(conn)

    def _next_frame(self, conn: _Connection) -> bytes | None:
        """The first whole frame of ``conn``'s inbox, taken out of it; None if there is none
        yet. Raises MalformedFrameError for a length outside (0, max_frame_bytes]."""
        inbox = conn.inbox
        if len(inbox) < 4:
            return None
        frame_size = _I32.unpack_from(inbox)[0]
        if not 0 < frame_size <= self._server._max_frame_bytes:
            raise frame_size_error(bytes(inbox[:2]), frame_size)
        total = 4 + frame_size
        if len(inbox) < total:
            return None
        frame = bytes(inbox[:total])
        del inbox[:total]
        if inbox:
            conn.since = conn.last_active
        return frame

    def _serve_frame(self, conn: _Connection, frame: bytes) -> bool:
        """Serve one request; False if the connection went to a thread with it."""
        frames, proto = conn.frames, conn.proto
        frames.frame = frame
        api, _, seqid = proto.read_message_begin()
        if api in self._grouped_methods:
            self._join_group(conn, api, seqid)
        elif api in self._inline:
            start = len(frames.outbox)
            self._dispatcher.answer(api, seqid, proto, proto, conn.role)
            self._answered(conn, api, seqid, start)
        else:
            self._hand_off(conn, frame)
            return False
        if len(frame) > LARGE_REPLY_BYTES:
            conn.proto = codec(frames)  # (its buffer grew to the request's size)
        return True

    def _answer_read(self, conn: _Connection, api: str, seqid: int, key: str) -> None:
        """Answer a get or lookup that framecheck.parse_usual_call parsed, as ``_serve_frame``
        would: the same handler method, the same reply (built by hand when it has the usual
        shape) or error."""
        dispatcher = self._dispatcher
        start = len(conn.frames.outbox)
        try:
            value = dispatcher.call(api, key)
        except Exception as exc:
            dispatcher.reply_error(conn.proto, api, seqid, exc)
        else:
            reply = read_reply(api, seqid, value)
            if reply is None:
                dispatcher.reply(conn.proto, api, seqid, value)
            else:
                conn.frames.outbox += reply
        self._answered(conn, api, seqid, start)

    def _answered(self, conn: _Connection, api: str, seqid: int, start: int) -> None:
        """An inline call's reply went into ``conn``'s outbox from ``start`` on: a large one
        is refused while the node holds too much unsent (rpc/budget.py); send it."""
        outbox = conn.frames.outbox
        size = len(outbox) - start
        if size > LARGE_REPLY_BYTES:
            if self._budget.is_over():
                refusal = self._budget.refusal(api, seqid, size, conn.peer)
                del outbox[start:]
                outbox += refusal
            self._count(conn)
            conn.proto = codec(conn.frames)  # (its buffer grew to the reply's size, unless
            # the reply was built by hand)
        self._outgoing.append(conn)

    def _join_group(
        self, conn: _Connection, api: str, seqid: int, args: list[Any] | None = None
    ) -> None:
        """Add a write to the newest group; ``args``: its arguments if decoded already."""
        dispatcher, grouped = self._dispatcher, self._grouped
        assert grouped is not None
        if args is None:
            args = dispatcher.read_args(api, conn.proto)
        try:
            write = grouped.prepare(api, args)
        except errors.KVError as exc:
            dispatcher.reply_error(conn.proto, api, seqid, exc)
            self._outgoing.append(conn)
            return
        conn.is_waiting = True
        key, groups = write.key, self._groups
        if not groups or key in self._newest_keys:
            groups.append([])  # after the earlier write to the key, in order
            self._newest_keys = set()
        groups[-1].append((conn, api, seqid, write))
        self._newest_keys.add(key)

    def _start_group(self) -> None:
        """Start the oldest group: its backups' replies are awaited on this thread's poll
        (a line another thread sends on is waited for in ``begin_group``)."""
        group = self._groups.popleft()
        if not self._groups:
            self._newest_keys = set()
        grouped = self._grouped
        assert grouped is not None
        try:
            pending = grouped.begin_group(
                [api for _, api, _, _ in group], [write for _, _, _, write in group]
            )
        except Exception as exc:  # a bug: every write of the group gets it
            log.exception("a group of %d writes failed", len(group))
            self._answer(group, [exc] * len(group))
            return
        self._in_flight = group, pending
        for _, delivery in pending.deliveries:
            fd = self._watch_reply(delivery)
            if fd >= 0:
                self._awaited[fd] = delivery  # (else closed meanwhile: end_group finds it)

    def _watch_reply(self, delivery: Any) -> int:
        """Arm the watch for ``delivery``'s reply: the descriptor it is reported on, -1 if
        there is none (closed meanwhile). The watch is a duplicate of the descriptor behind
        the delivery's ``watch_key``: another thread may close the line (its backup
        dropped), and the number of a closed descriptor is reused."""
        key = delivery.watch_key
        if key is None:
            return -1
        fd = self._watches.get(key, -1)
        if fd >= 0:
            try:
                self._poller.modify(fd, _REPLY)  # armed again: fires at once if readable
                return fd
            except OSError:
                self._unwatch(fd)
        try:
            number = key.fileno()
            fd = os.dup(number)
        except OSError:
            return -1
        if key.fileno() != number:  # a close sets the number to -1 before it closes:
            os.close(fd)  # the duplicate may be of the file that took the number since
            return -1
        try:
            self._poller.register(fd, _REPLY)
        except OSError:
            os.close(fd)
            return -1
        self._drop_stale_watches()
        self._watches[key] = fd
        return fd

    def _drop_stale_watches(self) -> None:
        """Close the lasting duplicates whose original was closed (on each sweep, and when
        a new line or log comes), then the oldest ones past the bound."""
        for key, fd in list(self._watches.items()):
            if fd not in self._awaited and key.fileno() < 0:
                self._unwatch(fd)
        for fd in list(self._watches.values()):
            if len(self._watches) < WATCHES_KEPT:
                return
            if fd not in self._awaited:
                self._unwatch(fd)

    def _unwatch(self, fd: int) -> None:
        """Stop keeping ``fd``, a lasting duplicate (at most WATCHES_KEPT), and close it."""
        for key, kept in list(self._watches.items()):
            if kept == fd:
                del self._watches[key]
        self._forget_line(fd)

    def _advance(self) -> None:
        """End the group in flight once none of its replies is awaited; begin the next."""
        while not self._awaited:
            if self._in_flight is not None:
                self._end_group()
            elif self._groups:
                self._start_group()
            else:
                return

    def _on_reply(self, fd: int, mask: int) -> None:
        """A line of the group in flight is readable: its reply came (or it broke)."""
        if self._awaited.pop(fd, None) is not None and mask & _BROKEN:
            self._unwatch(fd)  # the line is done for: no reply will come on it again
        # (else kept: the one-shot watch is disarmed until the next group arms it)

    def _forget_line(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            self._poller.unregister(fd)
        os.close(fd)

    def _end_group(self) -> None:
        assert self._in_flight is not None
        group, pending = self._in_flight
        self._in_flight = None
        grouped = self._grouped
        assert grouped is not None
        try:
            results = grouped.end_group(pending)
        except Exception as exc:  # a bug: every write of the group gets it
            log.exception("a group of %d writes failed", len(group))
            results = [exc] * len(group)
        self._answer(group, results)

    def _answer(self, group: list[_Entry], results: list[Any]) -> None:
        dispatcher, now = self._dispatcher, time.monotonic()
        for conn, _, _, _ in group:
            conn.is_waiting = False
        for (conn, api, seqid, _), result in zip(group, results, strict=True):
            if conn.is_closed:
                continue
            conn.last_active = conn.since = now  # (what it sent meanwhile waited for this)
            try:
                if conn.mask == 0 and not conn.peer_closed:
                    self._watch(conn, _IN)
                if isinstance(result, Exception):
                    dispatcher.reply_error(conn.proto, api, seqid, result)
                else:
                    dispatcher.reply(conn.proto, api, seqid, result)
            except Exception as exc:  # a result that does not encode: a bug
                log.error("could not answer %s to %s: %r", api, conn.peer, exc)
                self._close(conn)
                continue
            self._outgoing.append(conn)
            if conn.inbox or conn.peer_closed:
                self._ready.append(conn)

    def _hand_off(self, conn: _Connection, frame: bytes) -> None:
        """Serve ``conn`` on a thread of its own from ``frame`` on (the rest of its inbox
        after it), once the replies it is owed are sent (counted in the reply budget as the
        thread's until it sent them)."""
        owed = bytes(conn.frames.outbox)
        self._budget.add(len(owed))
        self._forget(conn)
        sock = conn.sock
        pending = frame + bytes(conn.inbox)
        try:
            sock.setblocking(True)  # the kernel timeouts set at admission apply again
            self._server._serve_in_thread(sock, conn.peer, Handover(pending, owed, conn.secured))
        except Exception as exc:
            log.warning("could not hand the connection from %s to a thread: %r", conn.peer, exc)
            self._budget.release(len(owed))
            self._server._forget_connection(sock)
            sock.close()

    def _send(self, conn: _Connection, now: float) -> None:
        outbox = conn.frames.outbox
        if conn.is_closed or not outbox:
            return
        try:
            sent = conn.send(outbox)  # TLS: all of it or, later, the same and more
        except _NOT_NOW:
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent == len(outbox):
            outbox.clear()
            if conn.held_bytes:
                self._budget.front_bytes -= conn.held_bytes
                conn.held_bytes = 0
            if conn.mask == _OUT:
                self._watch(conn, 0 if conn.peer_closed else _IN)
            if conn.peer_closed or conn.inbox:
                self._ready.append(conn)
            return
        del outbox[:sent]
        self._count(conn)
        if conn.mask != _OUT:
            conn.since = now  # the replies must drain within the frame deadline
            self._watch(conn, _OUT)

    def _count(self, conn: _Connection) -> None:
        """Count ``conn``'s outbox in the reply budget as it is now (see the module's
        docstring for when)."""
        size = len(conn.frames.outbox)
        self._budget.front_bytes += size - conn.held_bytes
        conn.held_bytes = size
        self._bound_outboxes()

    def _bound_outboxes(self) -> None:
        """A connection is served while it owes less than a frame, LARGE_REPLY_BYTES while
        the node is over its reply budget (set once a round, and as a count changes)."""
        if self._budget.is_over():
            self._outbox_bound = LARGE_REPLY_BYTES
        else:
            self._outbox_bound = self._server._max_frame_bytes

    def _watch(self, conn: _Connection, mask: int) -> None:
        conn.mask = mask
        try:
            self._poller.modify(conn.fd, mask)
        except OSError:
            self._close(conn)

    def _finish(self, conn: _Connection) -> None:
        """Close ``conn`` once the replies it is owed are sent (the sweep closes it if
        they do not drain within the frame deadline)."""
        self._stop_reading(conn)
        if conn.frames.outbox and not conn.is_closed:
            self._send(conn, time.monotonic())  # closes it (via _serve_frames) once sent
        else:
            self._close(conn)

    def _sweep(self, now: float) -> None:
        """Close connections past a bound: a frame or a reply slower than the frame
        deadline, or nothing for the idle timeout."""
        server = self._server
        deadline_s, idle_s = server._frame_deadline_s, server._idle_timeout_s
        for fd, delivery in list(self._awaited.items()):
            if now > delivery.deadline:  # the backup is silent: cut its line
                del self._awaited[fd]
                self._unwatch(fd)
                delivery.abandon()
        self._advance()
        self._drop_stale_watches()  # lines closed by other threads (a backup dropped)
        for conn in list(self._connections.values()):
            if conn.is_waiting:
                continue
            if conn.mask == _OUT and now - conn.since > deadline_s:
                log.warning("closing the connection from %s: replies not read", conn.peer)
            elif conn.inbox and now - conn.since > deadline_s and not _has_whole_frame(conn):
                log.warning(
                    "closing the connection from %s: %d frame bytes in %g s: too slow",
                    conn.peer,
                    len(conn.inbox),
                    deadline_s,
                )
            elif conn.partial_since and now - conn.partial_since > deadline_s:
                log.warning(
                    "closing the connection from %s: a TLS record not whole in %g s: too slow",
                    conn.peer,
                    deadline_s,
                )
            elif now - conn.last_active > idle_s and not conn.frames.outbox:
                log.debug("closing the connection from %s: no request for %g s", conn.peer, idle_s)
            else:
                continue
            self._close(conn)

    def _forget(self, conn: _Connection) -> None:
        """Serve ``conn`` no more: its replies are dropped (or were handed to a thread)."""
        conn.is_closed = True
        conn.frames.outbox.clear()  # (a group in flight may still refer to the connection)
        self._budget.front_bytes -= conn.held_bytes
        conn.held_bytes = 0
        self._connections.pop(conn.fd, None)
        with contextlib.suppress(OSError, ValueError):  # (gone already: nothing to undo)
            self._poller.unregister(conn.fd)

    def _close(self, conn: _Connection) -> None:
        if conn.is_closed:
            return
        self._forget(conn)
        self._server._forget_connection(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()


# Nothing to receive or no room to send now (TLS: a record not complete yet, or a write to
# retry later with the same bytes first).
_NOT_NOW = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _drain(conn: _Connection) -> bytes:
    """What a TLS connection decrypted beyond the last receive (epoll cannot see it)."""
    tls: Any = conn.tls if conn.tls is not None else conn.sock  # (an SSLSocket then)
    pending = tls.pending()
    if not pending:  # the usual case: a request is one record (spares 0.45 us a request)
        return b""
    chunks = []
    with contextlib.suppress(*_NOT_NOW):
        while pending:
            chunks.append(conn.receive(pending))
            pending = tls.pending()
    return b"".join(chunks)


def _has_whole_frame(conn: _Connection) -> bool:
    inbox = conn.inbox
    return len(inbox) >= 4 and len(inbox) >= 4 + _I32.unpack_from(inbox)[0]


def is_available() -> bool:
    """Whether this platform has epoll (Linux): the front needs it."""
    return hasattr(select, "epoll")
