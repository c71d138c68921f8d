"""Waking waiting threads cheaply.

A thread that must wait for another (a write for the batch that carries it to the backup,
an append for the fsync that covers it) waits on a plain lock created held, which the other
thread releases. ``threading.Event`` and ``threading.Condition`` cost a new lock per wait
and a Python loop per wake-up; under load they were a fifth of a durable primary's time.
Waiters pass a released lock on by acquiring and releasing it in turn.
"""

from __future__ import annotations

import threading


def held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


def pass_through(lock: threading.Lock) -> None:
    """Wait until ``lock`` is released, and leave it released for the next waiter."""
    lock.acquire()
    lock.release()
