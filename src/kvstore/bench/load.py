"""Run the load: in this process (:class:`LoadClients`) or spread over worker processes.

The one entry point callers use; the workload and its results are in
:mod:`kvstore.bench.workload`, the multi-process protocol in :mod:`kvstore.bench.procs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvstore.bench.procs import run_processes
from kvstore.bench.workload import BenchResult, LoadClients, Workload, merge
from kvstore.config import ClientConfig


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
        results = clients.run(start_ns, deadline_ns, progress)
        elapsed_s = (time.monotonic_ns() - began_ns) / 1e9
    finally:
        clients.close()
    return merge(workload, elapsed_s, results, began_ns, deadline_ns)
