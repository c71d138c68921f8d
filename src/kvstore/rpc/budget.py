"""The node's budget for reply bytes its clients have not read.

A reply is built whole before it is sent, and one its client does not read stays in the
node's memory until the connection is closed (a reply must drain within the frame deadline).
One connection holds little: the event front serves it no further while its replies wait, a
connection thread holds the one reply it is sending. Connections are many, though: 1024 that
each ask for a frame's worth (16 MiB: a get_many of 16 stored 1 MiB values) and never read
would make the node hold 16 GiB or more. The budget bounds the total, whatever the number of
connections:

- every reply the event front holds is counted (``front_bytes``: the sum of its outboxes,
  changed by the front's thread only), and so is every *large* reply (over
  LARGE_REPLY_BYTES) a connection thread is sending, or the replies the front handed it with
  its connection (``thread_bytes``, changed under the lock);
- a large reply produced while the total already held is over ``budget_bytes`` is not sent:
  the client gets UNAVAILABLE (retryable: only reads and calls that change nothing have
  large replies) instead, and a warning is logged at most once a second. The reply is
  built, then dropped: its size is known only then (it costs the time to encode it, which
  reading it would too), and the connection's codec, whose buffer grew to hold it, is
  renewed (front.codec). Replies of the node-only methods (replication, state transfer)
  are counted but never refused: clients that do not read must not keep a backup from
  joining;
- small replies are always served: while the node is over its budget the front serves a
  connection only while it owes less than LARGE_REPLY_BYTES, and a thread holds one reply.

So the replies held stay under about ``budget_bytes`` + two frames (a large reply admitted
just under the budget, by the front and by a thread) + connections x 2 x LARGE_REPLY_BYTES
(at the defaults, 1024 connections: under 0.5 GiB). Not counted: what the kernel's socket
buffers hold (its own bound, net.ipv4.tcp_wmem and tcp_mem), and requests being received
(up to a frame per connection, each within the frame deadline).
"""

from __future__ import annotations

import logging
import threading

from kvstore import errors
from kvstore.rpc.framecheck import _I32, _exception_frame, _ThrottledLog, shown_name

log = logging.getLogger(__name__)

MIB = 1 << 20
LARGE_REPLY_BYTES = 64 * 1024  # a reply larger than this may be refused for the budget
DEFAULT_REPLY_BUDGET_BYTES = 256 * MIB

refusal_log = _ThrottledLog("replies refused for the budget")


class ReplyBudget:
    """How many reply bytes the node holds that its clients have not read, against its
    budget (see the module's docstring)."""

    __slots__ = ("_lock", "budget_bytes", "front_bytes", "thread_bytes")

    def __init__(self, budget_bytes: int = DEFAULT_REPLY_BUDGET_BYTES) -> None:
        if budget_bytes < 1:
            raise ValueError("the reply budget must be positive")
        self.budget_bytes = budget_bytes
        self.front_bytes = 0  # the event front's outboxes (its thread alone changes it)
        self.thread_bytes = 0  # large replies connection threads send (under _lock)
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self.front_bytes + self.thread_bytes

    def is_over(self) -> bool:
        """Whether the replies held exceed the budget: large ones are refused meanwhile."""
        return self.front_bytes + self.thread_bytes > self.budget_bytes

    def take(self, size: int) -> bool:
        """Count a large reply of ``size`` bytes a connection thread is about to send; False
        (nothing counted) if the node is over its budget already. ``release`` it once sent."""
        with self._lock:
            if self.front_bytes + self.thread_bytes > self.budget_bytes:
                return False
            self.thread_bytes += size
        return True

    def add(self, size: int) -> None:
        """Count ``size`` bytes a connection thread holds whatever the budget (replies built
        already, or exempt from it); ``release`` them once sent."""
        with self._lock:
            self.thread_bytes += size

    def release(self, size: int) -> None:
        with self._lock:
            self.thread_bytes -= size

    def refusal(self, method: str, seqid: int, size: int, peer: str) -> bytes:
        """The UNAVAILABLE reply sent instead of a large reply of ``size`` bytes to ``method``
        while the node is over its budget (the refusal is logged at most once a second)."""
        message = (
            f"busy: this node holds {self.held_bytes / MIB:.1f} MiB of replies its clients "
            f"have not read (budget {self.budget_bytes / MIB:g} MiB); retry shortly"
        )
        refusal_log.warning(
            log, "refused a %d-byte %s reply to %s: %s", size, shown_name(method), peer, message
        )
        return _exception_frame(method, seqid, errors.UnavailableError.code, message)


def reply_header(frame: bytes) -> tuple[str, int]:
    """The method name and seqid of a framed reply built by this node (strict binary
    protocol: the version and type, the name, the seqid)."""
    name_size = _I32.unpack_from(frame, 8)[0]
    name = frame[12 : 12 + name_size].decode("utf-8", "replace")
    return name, _I32.unpack_from(frame, 12 + name_size)[0]
