"""The benchmark over several client processes: one BenchResult as if from one process.

The parent spawns the workers (the "spawn" start method: the parent may run kazoo
threads, which fork would copy mid-flight), each with its share of the threads and
its own range of thread ids (:func:`process_workloads`). Protocol over one pipe per
worker: the worker connects and sends "ready"; once all are ready the parent starts
the clock and sends "go" with the common deadline; each worker runs its threads until
then and sends back its combined :class:`~kvstore.bench.workload.ThreadResult` (histogram
encoded) with the time it finished. Every event is logged against the parent's
``start_ns`` (the monotonic clock is system-wide on Linux), so the merged log is one
history.

Every wait is bounded: a worker that does not answer in time is given up, and the
parent kills (by PID) any worker still running after a short join.

Ctrl-C: a worker ignores SIGINT, SIGTERM and SIGHUP, those a terminal or a service manager
sends the whole process group (blocked while it is spawned, as the standard library does for
its resource tracker, so none cuts its start-up short either). Its parent stops it:
interrupted after "go", the parent sends "stop", and each worker ends its run early (see
LoadClients.run) and sends what it did as its result, so the interrupted load still has its
whole history. A worker whose parent is gone (its end of the pipe closed) stops likewise,
and finds nobody to send to; one that outstays its parent's bounds is killed (SIGKILL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from typing import Any

from kvstore import errors
from kvstore.bench.workload import (
    STOP_GRACE_S,
    BenchResult,
    LoadClients,
    LoadInterrupted,
    ThreadResult,
    Workload,
    combine,
    merge,
)
from kvstore.config import ClientConfig

THREAD_ID_STRIDE = 1000  # process i uses thread ids from i * stride (at least)
START_GRACE_S = 30.0  # a worker's start-up (imports), on top of its ZooKeeper connect
RESULT_GRACE_S = 30.0  # a worker's finishing and sending its results, past the deadline
WORKER_IGNORES = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}  # its parent stops it


def split_threads(threads: int, procs: int) -> list[int]:
    """``threads`` spread as evenly as possible over at most ``procs`` processes (none empty)."""
    procs = max(1, min(procs, threads))
    share, extra = divmod(threads, procs)
    return [share + (1 if i < extra else 0) for i in range(procs)]


def process_workloads(workload: Workload, procs: int) -> list[Workload]:
    """Each process's share of ``workload``, with disjoint ranges of thread ids (and of the
    target rate, in proportion to its threads)."""
    shares = split_threads(workload.threads, procs)
    stride = -(-max(shares) // THREAD_ID_STRIDE) * THREAD_ID_STRIDE
    return [
        dataclasses.replace(
            workload,
            threads=threads,
            thread_id_base=workload.thread_id_base + i * stride,
            rate=workload.rate * threads / workload.threads,
            slot_phase=i / len(shares),
        )
        for i, threads in enumerate(shares)
    ]


def run_processes(
    workload: Workload,
    config: ClientConfig,
    procs: int,
    start_ns: int | None = None,
    on_start: Callable[[], None] | None = None,
) -> BenchResult:
    """:func:`kvstore.bench.load.run` over ``procs`` worker processes (spawned, not forked: this
    process has kazoo threads). KeyboardInterrupt after "go" stops the workers early and raises
    :class:`LoadInterrupted` with their results (plain KeyboardInterrupt before "go", or if a
    worker's results cannot be had in time)."""
    start_ns = time.monotonic_ns() if start_ns is None else start_ns
    context = multiprocessing.get_context("spawn")
    workers: list[tuple[Any, Any]] = []
    is_going = False
    try:
        for index, part in enumerate(process_workloads(workload, procs)):
            here, there = context.Pipe()
            process = context.Process(
                target=_process_main,
                args=(part, config, start_ns, there),
                name=f"kv-client-{index}",
                daemon=True,
            )
            _start_without_terminal_signals(process)
            there.close()
            workers.append((process, here))
        ready_by_ns = time.monotonic_ns() + int((config.zk_connect_timeout_s + START_GRACE_S) * 1e9)
        for _, conn in workers:
            _expect(conn, "ready", ready_by_ns)
        began_ns = time.monotonic_ns()
        deadline_ns = began_ns + int(workload.seconds * 1e9)
        is_going = True  # (from the first "go" on, a worker may be running)
        for _, conn in workers:
            conn.send(("go", deadline_ns))
        if on_start is not None:
            on_start()
        results_by_ns = deadline_ns + int(RESULT_GRACE_S * 1e9)
        replies = [_expect(conn, "result", results_by_ns) for _, conn in workers]
    except KeyboardInterrupt as interrupt:
        stopped = _stopped(workers) if is_going else None
        if stopped is None:
            raise
        partial = _merged(workload, stopped, began_ns, deadline_ns)
        raise LoadInterrupted(partial) from interrupt
    finally:
        _reap(workers)
    return _merged(workload, replies, began_ns, deadline_ns)


def _merged(workload: Workload, replies: list[Any], began_ns: int, deadline_ns: int) -> BenchResult:
    elapsed_s = (max(finished_ns for _, finished_ns in replies) - began_ns) / 1e9
    results = [ThreadResult.from_wire(wire) for wire, _ in replies]
    return merge(workload, elapsed_s, results, began_ns, deadline_ns)


def _start_without_terminal_signals(process: Any) -> None:
    """Start a worker with WORKER_IGNORES blocked (it inherits the mask, and ignores them
    before it unblocks them). Here they are held until the start is done, not lost."""
    # The first start of a process also starts multiprocessing's resource tracker, and
    # unblocks SIGINT after it (it blocks it around the tracker's start): that comes first.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORES)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stopped(workers: list[tuple[Any, Any]]) -> list[Any] | None:
    """Ask every worker to stop now; their results, or None if one does not send them in
    time (its share of the history missing, the rest is no history)."""
    for _, conn in workers:
        with contextlib.suppress(OSError):
            conn.send(("stop", None))
    results_by_ns = time.monotonic_ns() + int(RESULT_GRACE_S * 1e9)
    try:
        return [_expect(conn, "result", results_by_ns) for _, conn in workers]
    except errors.KVError:
        return None


def _expect(conn: Any, kind: str, until_ns: int) -> Any:
    """The next message from a worker process, which must be ``kind``; its payload."""
    timeout_s = max(0.0, (until_ns - time.monotonic_ns()) / 1e9)
    try:
        if not conn.poll(timeout_s):
            raise errors.KVError(f"a client process sent no {kind!r} within its time limit")
        message = conn.recv()
    except (EOFError, OSError):
        raise errors.KVError(f"a client process exited before sending {kind!r}") from None
    if message[0] == "error":
        _, name, text = message
        error_class = getattr(errors, name, None)
        if not (isinstance(error_class, type) and issubclass(error_class, errors.KVError)):
            error_class = errors.KVError
        raise error_class(text)
    if message[0] != kind:
        raise errors.KVError(f"a client process sent {message[0]!r}, expected {kind!r}")
    return message[1:] if len(message) > 2 else message[1]


def _reap(workers: list[tuple[Any, Any]]) -> None:
    """Close the pipes (a worker still waiting for "go" then quits), join each worker
    briefly, and kill (by its PID) any that still runs."""
    for _, conn in workers:
        conn.close()
    for process, _ in workers:
        process.join(timeout=STOP_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join(timeout=STOP_GRACE_S)


def _process_main(workload: Workload, config: ClientConfig, start_ns: int, conn: Any) -> None:
    """A worker process: connect, report ready, run from "go" to its deadline (or until its
    parent says "stop" or is gone), send results."""
    for signum in WORKER_IGNORES:  # the parent stops it (see the module's docstring)
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORES)
    try:
        clients = LoadClients(workload, config)
    except errors.KVError as exc:
        conn.send(("error", type(exc).__name__, str(exc)))
        return
    try:
        conn.send(("ready", None))
        # The parent sends "go" as soon as every process is ready. It gives up waiting for
        # the others well within this bound, and closes the pipe then (poll() sees EOF).
        if not conn.poll(config.zk_connect_timeout_s + 2 * START_GRACE_S):
            return
        kind, deadline_ns = conn.recv()
        if kind != "go":
            return
        stop = threading.Event()
        listen_s = (deadline_ns - time.monotonic_ns()) / 1e9 + RESULT_GRACE_S
        threading.Thread(
            target=_stop_when_told, args=(conn, stop, listen_s), name="stop", daemon=True
        ).start()
        results = clients.run(start_ns, deadline_ns, stop=stop)
        finished_ns = time.monotonic_ns()
    except (EOFError, OSError):
        return  # the parent is gone or gave up
    finally:
        clients.close()
    with contextlib.suppress(OSError):
        conn.send(("result", combine(results).to_wire(), finished_ns))


def _stop_when_told(conn: Any, stop: threading.Event, timeout_s: float) -> None:
    """Set ``stop`` when the parent says "stop" or its end of the pipe closes (within
    ``timeout_s``; the only reader of ``conn`` once the run started)."""
    try:
        if not conn.poll(max(0.0, timeout_s)):
            return
        conn.recv()
    except (EOFError, OSError):
        pass
    stop.set()
