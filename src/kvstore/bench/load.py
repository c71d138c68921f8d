"""Run the load: in this process (:class:`LoadClients`) or spread over worker processes.

The one entry point callers use; the workload and its results are in
:mod:`kvstore.bench.workload`, the multi-process protocol in :mod:`kvstore.bench.procs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvstore.bench.clients import client_for
from kvstore.bench.procs import run_processes
from kvstore.bench.workload import (
    BenchResult,
    LoadClients,
    LoadInterrupted,
    RunInterrupted,
    Workload,
    key_names,
    merge,
)
from kvstore.check.history import WRITE, Event
from kvstore.config import ClientConfig

# The thread id under which starting values are logged (load threads count from 0).
STARTING_TID = 999_999_999


def run(
    workload: Workload,
    config: ClientConfig,
    start_ns: int | None = None,
    procs: int = 1,
    on_start: Callable[[], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> BenchResult:
    """Run the workload against the cluster ``config`` points at; blocks ~workload.seconds.

    ``start_ns`` is the time origin of the logged events (default: now). With
    ``procs`` > 1 the threads are spread over that many worker processes. ``on_start``
    is called once the clients are connected, when the clock starts; ``progress`` about
    once a second while it runs (in one process only).

    Ctrl-C (KeyboardInterrupt) once the clock started ends the run early with
    :class:`LoadInterrupted`, which holds the run until then (see LoadClients.run); before
    it, or when a worker process's part cannot be had, plain KeyboardInterrupt.
    """
    if min(procs, workload.threads) > 1:
        return run_processes(workload, config, procs, start_ns, on_start)
    start_ns = time.monotonic_ns() if start_ns is None else start_ns
    clients = LoadClients(workload, config)
    try:
        began_ns = time.monotonic_ns()
        deadline_ns = began_ns + int(workload.seconds * 1e9)
        if on_start is not None:
            on_start()
        try:
            results = clients.run(start_ns, deadline_ns, progress)
        except RunInterrupted as interrupted:
            elapsed_s = (time.monotonic_ns() - began_ns) / 1e9
            partial = merge(workload, elapsed_s, interrupted.results, began_ns, deadline_ns)
            raise LoadInterrupted(partial) from interrupted
        elapsed_s = (time.monotonic_ns() - began_ns) / 1e9
    finally:
        clients.close()
    return merge(workload, elapsed_s, results, began_ns, deadline_ns)


def starting_values(config: ClientConfig, keyspace: int, timeout_s: float = 30.0) -> list[Event]:
    """The workload's keys that hold a value already, as writes completed at time 0 of the
    run's log (its load then starts later): a checker treats every key as starting empty,
    so a run on a cluster that earlier runs wrote to would otherwise read values "never
    written". Raises KVError if the cluster cannot be read."""
    with client_for(config, timeout_s) as client:
        found = client.get_many(key_names(keyspace))
    events: list[Event] = []
    for key, value in found.items():
        if value:  # (absent and "" are the same to the checker: the starting state)
            events += [
                (0, False, STARTING_TID, WRITE, key, value),
                (0, True, STARTING_TID, WRITE, key, None),
            ]
    return events
