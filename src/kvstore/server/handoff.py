"""Waking waiting threads cheaply.

A thread that must wait for another (a write for the batch that carries it to the backup,
an append for the fsync that covers it) waits on a plain lock created held, which the other
thread releases. ``threading.Event`` and ``threading.Condition`` cost a new lock per wait
and a Python loop per wake-up; under load they were a fifth of a durable primary's time.
Waiters pass a released lock on by acquiring and releasing it in turn.

An event loop cannot wait on a lock: a :class:`PollSignal` is an eventfd it can poll beside
its sockets, kept for the lifetime of what signals it (a log's syncer, a backup's sender
thread), so that the loop keeps it registered (rpc/front.py).
"""

from __future__ import annotations

import contextlib
import os
import threading


def held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


def pass_through(lock: threading.Lock) -> None:
    """Wait until ``lock`` is released, and leave it released for the next waiter."""
    lock.acquire()
    lock.release()


class PollSignal:
    """An eventfd one thread signals and one event loop polls, for as long as the signalling
    thread lives; ``fileno`` is -1 once it is closed (after the last signal). Signals and the
    loop's ``clear`` never race the close (the number would go to another file)."""

    __slots__ = ("_fd", "_lock")

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd

    def signal(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def clear(self) -> None:
        """Take the signals given so far (readable again on the next one)."""
        with self._lock, contextlib.suppress(BlockingIOError):
            if self._fd >= 0:
                os.eventfd_read(self._fd)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
