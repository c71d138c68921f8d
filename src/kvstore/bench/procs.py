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
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from kvstore import errors
from kvstore.bench.workload import (
    STOP_GRACE_S,
    BenchResult,
    LoadClients,
    ThreadResult,
    Workload,
    combine,
    merge,
)
from kvstore.config import ClientConfig

THREAD_ID_STRIDE = 1000  # process i uses thread ids from i * stride (at least)
START_GRACE_S = 30.0  # a worker's start-up (imports), on top of its ZooKeeper connect
RESULT_GRACE_S = 30.0  # a worker's finishing and sending its results, past the deadline


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
    process has kazoo threads)."""
    start_ns = time.monotonic_ns() if start_ns is None else start_ns
    context = multiprocessing.get_context("spawn")
    workers = []
    try:
        for index, part in enumerate(process_workloads(workload, procs)):
            here, there = context.Pipe()
            process = context.Process(
                target=_process_main,
                args=(part, config, start_ns, there),
                name=f"kv-client-{index}",
                daemon=True,
            )
            process.start()
            there.close()
            workers.append((process, here))
        ready_by_ns = time.monotonic_ns() + int((config.zk_connect_timeout_s + START_GRACE_S) * 1e9)
        for _, conn in workers:
            _expect(conn, "ready", ready_by_ns)
        began_ns = time.monotonic_ns()
        deadline_ns = began_ns + int(workload.seconds * 1e9)
        for _, conn in workers:
            conn.send(("go", deadline_ns))
        if on_start is not None:
            on_start()
        results_by_ns = deadline_ns + int(RESULT_GRACE_S * 1e9)
        replies = [_expect(conn, "result", results_by_ns) for _, conn in workers]
    finally:
        _reap(workers)
    elapsed_s = (max(finished_ns for _, finished_ns in replies) - began_ns) / 1e9
    results = [ThreadResult.from_wire(wire) for wire, _ in replies]
    return merge(workload, elapsed_s, results, began_ns, deadline_ns)


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
    """A worker process: connect, report ready, run from "go" to its deadline, send results."""
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
        results = clients.run(start_ns, deadline_ns)
        finished_ns = time.monotonic_ns()
    except (EOFError, OSError):
        return  # the parent is gone or gave up
    finally:
        clients.close()
    with contextlib.suppress(OSError):
        conn.send(("result", combine(results).to_wire(), finished_ns))
