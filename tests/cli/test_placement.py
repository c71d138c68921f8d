"""kv-node's CPU placement (--cpu auto pins a node to one CPU only when nobody placed it) and
scheduling policy (--sched)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvstore.cli.args import CPU_ALL, CPU_AUTO, cpu_list, placement
from kvstore.local.cluster import LocalCluster

CPUS = os.cpu_count() or 1
needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or len(os.sched_getaffinity(0)) != CPUS,
    reason="needs a machine with several CPUs, all of them allowed to this process",
)


@pytest.fixture
def own_affinity() -> Iterator[set[int]]:
    saved = os.sched_getaffinity(0)
    try:
        yield saved
    finally:
        os.sched_setaffinity(0, saved)


def test_a_list_is_taken_as_given_and_all_leaves_the_node_free() -> None:
    assert placement(cpu_list("0"), 11901) == {0}
    assert placement(cpu_list(CPU_ALL), 11901) is None


@needs_two_cpus
def test_auto_spreads_nodes_over_the_cpus_by_port() -> None:
    chosen = {next(iter(placement(CPU_AUTO, port) or {-1})) for port in range(11900, 11900 + CPUS)}
    assert chosen == set(range(CPUS))


@needs_two_cpus
def test_auto_respects_a_placement_made_by_someone_else(own_affinity: set[int]) -> None:
    os.sched_setaffinity(0, {0})  # taskset -c 0, or a cpuset of one
    assert placement(CPU_AUTO, 11901) is None


@needs_two_cpus
def test_a_node_started_by_default_runs_on_one_cpu(shared_cluster: LocalCluster) -> None:
    for node in shared_cluster.nodes:
        assert node.pid is not None
        assert len(os.sched_getaffinity(node.pid)) == 1, node.log_tail()


def test_a_local_clusters_nodes_run_every_thread_under_sched_batch(
    shared_cluster: LocalCluster,
) -> None:
    """(kv-node's default is the kernel's; a local cluster's nodes share a CPU, see cluster.py)"""
    for node in shared_cluster.nodes:
        assert node.pid is not None
        policies = set()
        for tid in os.listdir(f"/proc/{node.pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                policies.add(os.sched_getscheduler(int(tid)))
        assert policies == {os.SCHED_BATCH}, node.log_tail()


@pytest.mark.parametrize(("policy", "expected"), [("batch", "3"), ("normal", "0")])
def test_the_policy_chosen_holds_for_threads_started_after_it(policy: str, expected: str) -> None:
    code = (
        "import os, threading\n"
        "from kvstore.cli.args import set_scheduling\n"
        f"print(set_scheduling({policy!r}))\n"
        "t = threading.Thread(target=lambda: print(os.sched_getscheduler(0)))\n"
        "t.start(); t.join()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out == ["None", expected]
