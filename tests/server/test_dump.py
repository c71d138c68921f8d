"""``dump`` is one consistent cut of the whole store, across stripes (real node processes).

Writers each walk a chain of keys in order, writing round r to chain key 0, then 1, ...,
each put acknowledged before the next. In any consistent cut a chain reads r, ..., r,
r - 1, ..., r - 1: never a later key ahead of an earlier one. A dump that copies stripe by
stripe without holding them together sees such inversions (the test found several per
hundred dumps before dump held every stripe's read lock).
"""

from __future__ import annotations

import itertools
import threading

import kvstore
from kvstore.local.cluster import LocalCluster
from kvstore.rpc import Connection

WRITERS = 3
CHAIN_KEYS = 12
DUMPS = 300


def chain_key(writer: int, index: int) -> str:
    return f"chain-{writer}-{index:02d}"


def inversions(dump: dict[str, str]) -> list[str]:
    """Chains that no consistent cut could show."""
    found = []
    for writer in range(WRITERS):
        rounds = [int(dump.get(chain_key(writer, i), "-1")) for i in range(CHAIN_KEYS)]
        ordered = all(a >= b for a, b in itertools.pairwise(rounds))
        if not ordered or rounds[0] - rounds[-1] > 1:
            found.append(f"chain {writer}: {rounds}")
    return found


def test_dump_is_a_consistent_cut_across_stripes(shared_cluster: LocalCluster) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def write_chain(writer: int) -> None:
        try:
            with kvstore.Client(
                shared_cluster.zk_connect, shared_cluster.zk_path, timeout=30
            ) as kv:
                for round_ in range(1_000_000):
                    for index in range(CHAIN_KEYS):
                        if stop.is_set():
                            return
                        kv.put(chain_key(writer, index), str(round_))
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    writers = [threading.Thread(target=write_chain, args=(w,)) for w in range(WRITERS)]
    for thread in writers:
        thread.start()
    primary = shared_cluster.wait_for("primary")
    conn = Connection(primary.address, timeout_ms=10_000)
    seen: list[str] = []
    try:
        for _ in range(DUMPS):
            seen.extend(inversions(conn.call("dump")))
    finally:
        stop.set()
        conn.close()
        for thread in writers:
            thread.join(30)
    assert not errors, errors
    assert not seen, f"{len(seen)} chains out of order in {DUMPS} dumps, e.g. {seen[:3]}"
