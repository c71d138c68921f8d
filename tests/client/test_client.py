"""kvstore.Client against real node processes and a real ZooKeeper: the store API, its
replication (deletes, compare-and-set, exactly-once records), retries through kill -9.

The tests that leave both nodes serving share one cluster (conftest's ``shared_cluster``);
those that kill a node have one of their own."""

from __future__ import annotations

import copy
import gc
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import kvstore
from kvstore.bench.faults import Killer
from kvstore.client.status import cluster_state
from kvstore.config import ClientConfig
from kvstore.coordination import connect, create_parent
from kvstore.idl import RequestId
from kvstore.local.cluster import LocalCluster
from kvstore.local.processes import wait_until
from kvstore.local.zkserver import ZooKeeperServer
from kvstore.rpc import MAX_ELEMENTS, Connection

CAS_THREADS = 3
CAS_SECONDS = 12.0


def fail_over(cluster: LocalCluster) -> str:
    """kill -9 the primary, restart it, and return the new primary's address."""
    old = cluster.wait_for("primary")
    old.kill()
    new = cluster.wait_for("primary")
    old.start()
    assert new.address != old.address
    return new.address


def test_round_trip_tells_missing_from_empty(shared_cluster: LocalCluster) -> None:
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=5) as kv:
        assert kv.get("nothing") is None
        kv.put("empty", "")
        assert kv.get("empty") == ""
        kv.put("k", "v")
        assert kv.get("k") == "v"
        assert kv.get_many(["k", "empty", "nothing"]) == {"k": "v", "empty": "", "nothing": None}
        assert kv.delete("k") is True
        assert kv.delete("k") is False
        assert kv.get("k") is None
        assert kv.cas("c", None, "1") is True
        assert kv.cas("c", None, "2") is False
        assert kv.cas("c", "9", "2") is False
        assert kv.cas("c", "1", "2") is True
        assert kv.get("c") == "2"


def test_threads_write_under_lanes_of_their_own_and_a_nested_write_too(
    shared_cluster: LocalCluster,
) -> None:
    """Each thread's writes carry its own lane id with acked_below = seq; a write made from
    inside another (as a signal handler or a finalizer could) gets a lane of its own, so
    it cannot make the primary forget the outer write's record while that one may retry."""
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=5) as kv:
        sent: list[RequestId] = []
        real_call = kv._call

        def spying_call(method: str, args: tuple[object, ...], **kwargs: object) -> object:
            if isinstance(args[-1], RequestId):
                sent.append(copy.copy(args[-1]))  # (a lane reuses its RequestId)
                if args[0] == "outer":
                    kv.put("inner", "1")  # a write nested in this one, on the same thread
            return real_call(method, args, **kwargs)

        kv._call = spying_call  # type: ignore[method-assign]
        kv.put("outer", "1")
        kv.put("outer-again", "1")
        worker = threading.Thread(target=kv.put, args=("other-thread", "1"))
        worker.start()
        worker.join(10)
        assert kv.get_many(["outer", "inner", "outer-again", "other-thread"]) == dict.fromkeys(
            ["outer", "inner", "outer-again", "other-thread"], "1"
        )
    outer, inner, again, other = sent
    assert inner.client_id != outer.client_id
    assert (again.client_id, again.seq) == (outer.client_id, outer.seq + 1)
    assert other.client_id != outer.client_id  # the main thread still holds that lane
    # The nested write's lane went back to the free list: reused, its sequence going on.
    assert other.client_id != inner.client_id or other.seq == inner.seq + 1
    assert len({(r.client_id, r.seq) for r in sent}) == len(sent)
    assert all(r.acked_below == r.seq for r in sent)


def test_a_forked_child_writes_under_another_id(shared_cluster: LocalCluster) -> None:
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=5) as kv:
        kv.put("before-fork", "1")
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its id, touch nothing else
            os.write(writer, kv.client_id.encode())
            os._exit(0)
        os.close(writer)
        child_id = os.read(reader, 100).decode()
        os.close(reader)
        assert os.waitpid(pid, 0)[1] == 0
        assert child_id and child_id != kv.client_id


def test_permanent_errors_are_raised_at_once(shared_cluster: LocalCluster) -> None:
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=5) as kv:
        began = time.monotonic()
        with pytest.raises(kvstore.TooLargeError):
            kv.put("x" * 5000, "v")
        assert time.monotonic() - began < 4  # not retried until the timeout
        # Over the frame limit the node closes the connection unread (it was retried as a
        # lost connection until the timeout, then reported as maybe applied).
        began = time.monotonic()
        with pytest.raises(kvstore.TooLargeError, match="frame limit") as too_large:
            kv.put("big", "x" * (20 << 20))
        assert time.monotonic() - began < 4 and too_large.value.is_definite
        assert kv.get("big") is None


def test_a_call_ends_at_its_timeout_not_at_the_rpc_timeout(idle_cluster: LocalCluster) -> None:
    """A paused primary (no backup to take over): a call with a timeout below the RPC
    timeout (2 s) ends at its own, and a retry near the deadline is bounded by what is left
    of it (each attempt waited the whole RPC timeout, so a call could run 2.5 s over)."""
    only = idle_cluster.nodes[0]
    only.start()
    only.wait_for_role(["primary"])
    with kvstore.Client(idle_cluster.zk_connect, idle_cluster.zk_path, timeout=5) as kv:
        kv.put("k", "v")
    assert only.pid is not None
    short = kvstore.Client(idle_cluster.zk_connect, idle_cluster.zk_path, timeout=0.3)
    # 3 s: a first attempt of 2 s, then one bounded by the 1 s left (not another 2 s).
    longer = kvstore.Client(idle_cluster.zk_connect, idle_cluster.zk_path, timeout=3)
    with short, longer:
        assert short.get("k") == "v" and longer.get("k") == "v"  # (located before the pause)
        os.kill(only.pid, signal.SIGSTOP)
        try:
            for call, bound_s in (
                (lambda: short.get("k"), 1.0),
                (lambda: short.put("k", "w"), 1.0),
                (lambda: longer.put("k", "w"), 3.7),
            ):
                began = time.monotonic()
                with pytest.raises(kvstore.DeadlineExceededError):
                    call()
                assert time.monotonic() - began < bound_s
        finally:
            os.kill(only.pid, signal.SIGCONT)


def test_deletes_and_cas_survive_failover(cluster: LocalCluster) -> None:
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        for i in range(50):
            kv.put(f"k{i}", f"v{i}")
        for i in range(0, 50, 2):
            assert kv.delete(f"k{i}")
        assert kv.cas("k1", "v1", "swapped")
        scan = kv.scan(chunk_keys=1)  # (a stripe or so per call)
        next(scan)
        fail_over(cluster)
        values = kv.get_many([f"k{i}" for i in range(50)])
        # the new primary's stripes are not the old one's: the scan cannot go on there
        with pytest.raises(kvstore.UnavailableError, match="primary changed during the scan"):
            list(scan)
        scanned = dict(kv.scan())
    expected = {f"k{i}": (None if i % 2 == 0 else f"v{i}") for i in range(50)}
    expected["k1"] = "swapped"
    assert values == expected
    assert scanned == {k: v for k, v in expected.items() if v is not None}


def test_a_retried_write_gets_its_original_outcome_after_failover(cluster: LocalCluster) -> None:
    """The exactly-once records travel with the writes: the new primary answers a retry
    of an applied request from its record instead of applying it again."""
    primary = cluster.wait_for("primary").address
    conn = Connection(primary)
    first = RequestId(client_id="c1", seq=1, acked_below=1)
    newer = RequestId(client_id="c1", seq=2, acked_below=1)
    swap = RequestId(client_id="c1", seq=3, acked_below=1)
    conn.call("put_once", "k", "first", first)
    conn.call("put_once", "k", "newer", newer)
    assert conn.call("compare_and_set", "c", None, "a", swap) is True
    conn.close()

    conn = Connection(fail_over(cluster))
    try:
        conn.call("put_once", "k", "first", first)  # a retry whose reply was lost
        assert conn.call("compare_and_set", "c", None, "a", swap) is True
        assert conn.call("lookup", "k").value == "newer"  # not overwritten by the retry
        fresh = RequestId(client_id="c1", seq=4, acked_below=1)
        assert conn.call("compare_and_set", "c", None, "a", fresh) is False
    finally:
        conn.close()


def test_shared_client_cas_counter_under_primary_kills(cluster: LocalCluster) -> None:
    """Threads increment one counter with cas while the primary is killed -9 and restarted:
    no error reaches a caller, and the counter equals the number of cas calls that
    returned True (a cas applied twice, or applied but reported False, breaks it)."""
    successes = [0] * CAS_THREADS
    failures: list[BaseException] = []
    deadline = time.monotonic() + CAS_SECONDS
    killer = Killer(cluster, "primary", (3.0, 3.5), CAS_SECONDS, seed=7)
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=15) as kv:

        def increment(slot: int) -> None:
            try:
                while time.monotonic() < deadline:
                    current = kv.get("counter")
                    following = str(int(current or "0") + 1)
                    if kv.cas("counter", current, following):
                        successes[slot] += 1
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=increment, args=(i,)) for i in range(CAS_THREADS)]
        killer.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CAS_SECONDS + 30)
        killer.join()
        assert not failures, failures
        assert not any(thread.is_alive() for thread in threads)
        assert len(killer.kills) >= 2, killer.kills
        assert sum(successes) > 0
        assert kv.get("counter") == str(sum(successes))


def test_backup_joining_while_deletes_run_ends_identical(
    idle_cluster: LocalCluster,
) -> None:
    first, second = idle_cluster.nodes
    first.start()
    first.wait_for_role(["primary"])
    stop = threading.Event()
    with kvstore.Client(idle_cluster.zk_connect, idle_cluster.zk_path, timeout=10) as kv:
        for i in range(3000):
            kv.put(f"k{i}", "x" * 50)

        def churn() -> None:
            i = 0
            while not stop.is_set() and i < 200_000:
                kv.delete(f"k{i % 3000}")
                kv.put(f"k{(i * 7) % 3000}", f"v{i}")
                i += 1

        writer = threading.Thread(target=churn)
        writer.start()
        try:
            second.start()
            second.wait_for_role(["backup"])
        finally:
            stop.set()
            writer.join(30)
        expected = kv.get_many([f"k{i}" for i in range(3000)])
        first.kill()
        second.wait_for_role(["primary"])
        assert kv.get_many([f"k{i}" for i in range(3000)]) == expected


def test_seed_rule_when_the_parent_has_no_metadata(
    shared_cluster: LocalCluster, zk_server: ZooKeeperServer
) -> None:
    """A parent znode without kvstore metadata (a shared_cluster of the seed's nodes) is read
    with the seed's rule: the lowest child is the primary. Get and put only."""
    primary = shared_cluster.wait_for("primary").address
    seed_path = shared_cluster.zk_path + "-seed"
    zk = connect(zk_server.connect_string, 10.0, 10.0)
    try:
        zk.ensure_path(seed_path)
        # The seed's nodes register ephemeral sequential znodes, as kvstore's do.
        zk.create(f"{seed_path}/node", primary.encode(), ephemeral=True, sequence=True)
        zk.create(f"{seed_path}/node", b"127.0.0.1:1", ephemeral=True, sequence=True)
        with kvstore.Client(zk_server.connect_string, seed_path, timeout=5) as kv:
            kv.put("seed-key", "seed-value")
            assert kv.get("seed-key") == "seed-value"
            with pytest.raises(kvstore.UnsupportedError):
                kv.delete("seed-key")
    finally:
        zk.stop()
        zk.close()
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=5) as kv:
        wait_until(lambda: kv.get("seed-key"), 5, lambda: "the seed-rule put is not there")


def test_seed_nodes_under_a_parent_made_by_kv_createznode_are_found_by_the_seed_rule(
    shared_cluster: LocalCluster, zk_server: ZooKeeperServer
) -> None:
    """kv-createznode gives a new parent kvstore metadata (an incarnation id) and no primary:
    the seed's nodes registering under it name none either. Get and put still find the
    lowest node (the seed's rule); a write only kvstore nodes serve waits for a primary."""
    primary = shared_cluster.wait_for("primary").address
    seed_path = shared_cluster.zk_path + "-seed-made-by-us"
    create_parent(zk_server.connect_string, seed_path)
    zk = connect(zk_server.connect_string, 10.0, 10.0)
    try:
        zk.create(f"{seed_path}/node", primary.encode(), ephemeral=True, sequence=True)
        with kvstore.Client(zk_server.connect_string, seed_path, timeout=1) as kv:
            kv.put("seed-key-2", "seed-value")
            assert kv.get("seed-key-2") == "seed-value"
            with pytest.raises(kvstore.DeadlineExceededError, match="no primary yet"):
                kv.delete("seed-key-2")
    finally:
        zk.stop()
        zk.close()


def test_a_get_many_whose_reply_would_not_fit_a_frame_is_refused(
    shared_cluster: LocalCluster,
) -> None:
    """A few hundred bytes naming many large values must not make the node build (and hold
    for a client that never reads) a reply of any size; the library asks for fewer."""
    big = "x" * (1 << 20)  # the largest value a node takes by default
    keys = [f"big{i}" for i in range(17)]  # 17 MiB together: more than a 16 MiB frame
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=30) as kv:
        for key in keys:
            kv.put(key, big)
        assert kv.get_many(keys) == dict.fromkeys(keys, big)  # (asked for in parts)
    primary = shared_cluster.wait_for("primary")
    conn = Connection(primary.address, 30_000)
    try:
        with pytest.raises(kvstore.TooLargeError, match="ask for fewer keys"):
            conn.call("get_many", keys)
        assert conn.call("get_many", keys[:8]) == dict.fromkeys(keys[:8], big)
    finally:
        conn.close()


def test_get_many_of_more_keys_than_a_request_may_hold_is_split(
    shared_cluster: LocalCluster,
) -> None:
    keys = [f"many{i}" for i in range(MAX_ELEMENTS + 10_000)]  # one request would be refused
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=30) as kv:
        kv.put(keys[-1], "last")
        found = kv.get_many(keys)
    assert len(found) == len(keys)
    assert found[keys[-1]] == "last" and found[keys[0]] is None


def test_get_many_in_chunks_is_bounded_by_one_timeout(
    shared_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timeout bounds the whole get_many, not each chunk of it: of six chunks that take
    0.5 s each (a slow network), a 1 s timeout lets two or three be asked, not all six."""
    monkeypatch.setattr("kvstore.client.client.GET_MANY_KEYS", 2)
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=1) as kv:
        assert kv.get_many(["a", "b", "c"]) == dict.fromkeys("abc")  # (quick: all of it)
        real_call_once = kv._call_once
        asked: list[object] = []

        def slow_call_once(method: str, args: tuple[object, ...], remaining_s: float) -> object:
            asked.append(args[0])
            time.sleep(min(0.5, remaining_s))
            return real_call_once(method, args, remaining_s)

        monkeypatch.setattr(kv, "_call_once", slow_call_once)
        with pytest.raises(kvstore.DeadlineExceededError, match="get_many did not succeed"):
            kv.get_many([f"slow{i}" for i in range(12)])
        assert 2 <= len(asked) <= 3, asked


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_a_timeout_must_be_a_positive_number(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be"):
        kvstore.Client("127.0.0.1:1", "/x", timeout=timeout)


def test_a_closed_client_says_so_at_once(shared_cluster: LocalCluster) -> None:
    kv = kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=30)
    kv.put("k", "v")
    kv.close()
    started = time.monotonic()
    with pytest.raises(kvstore.UnavailableError, match="closed"):
        kv.get("k")
    assert time.monotonic() - started < 1  # not after its 30 s timeout


def test_an_application_without_logging_gets_no_stray_stderr_lines() -> None:
    """kazoo's connection warnings stay out of an unconfigured application's stderr (its
    last-resort handler) and reach a configured one's handlers."""
    script = (
        "import logging, sys, kvstore\n"
        "if sys.argv[1] == 'configured': logging.basicConfig()\n"
        "try: kvstore.Client('127.0.0.1:1', '/x', timeout=1)\n"
        "except kvstore.CoordinationError as exc: print('refused:', exc)\n"
    )
    for how in ("bare", "configured"):
        done = subprocess.run(
            [sys.executable, "-c", script, how],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.stdout.startswith("refused: cannot reach ZooKeeper"), done
        if how == "bare":
            assert done.stderr == ""
        else:
            assert "WARNING:kazoo.client:Connection dropped" in done.stderr


def test_a_call_into_a_connection_the_node_closed_is_retried_and_applied_once(
    idle_cluster: LocalCluster,
) -> None:
    """A connection in use is not polled for EOF before each call (every call may be
    repeated): one the node closed meanwhile fails the call's first attempt, and the retry
    applies it once."""
    for node in idle_cluster.nodes:
        node.extra_args += ["--idle-timeout", "0.2"]
    idle_cluster.start()
    with kvstore.Client(idle_cluster.zk_connect, idle_cluster.zk_path, timeout=10) as kv:
        kv.put("n", "0")
        for i in range(3):
            sock = kv._local.conn.raw_socket
            assert sock is not None
            # the node closes it (idle): EOF waits on it, well within the 1 s after which a
            # connection at rest is checked before use
            wait_until(lambda s=sock: select.select([s], [], [], 0)[0] or None, 5.0, "not closed")
            assert kv.cas("n", str(i), str(i + 1))
            assert kv._local.conn.raw_socket is not sock  # (a new connection took the retry)
        assert kv.get("n") == "3"


def test_a_scan_of_multibyte_values_fits_each_reply(idle_cluster: LocalCluster) -> None:
    """A scan's chunk is bounded by its bytes, not its characters: values of 3-byte
    characters (27 MB in all) come in chunks that each fit a reply (it was refused as
    TooLargeError: the chunk was cut at half a reply's worth of characters)."""
    first = idle_cluster.nodes[0]
    first.start()
    first.wait_for_role(["primary"])
    value = "漢" * 20_000  # 60,000 bytes
    keys = [f"k{i}" for i in range(450)]
    with kvstore.Client(idle_cluster.zk_connect, idle_cluster.zk_path, timeout=60) as kv:
        for key in keys:
            kv.put(key, value)
        found = dict(kv.scan())
    assert sorted(found) == sorted(keys)
    assert set(found.values()) == {value}


def test_threads_that_end_take_their_connections_with_them(shared_cluster: LocalCluster) -> None:
    """A process that starts a thread per task must not keep a connection per thread it ever
    ran: the node refuses connections past --max-connections (1024), every client's."""
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=10) as kv:
        kv.put("k", "v")
        for _ in range(50):
            thread = threading.Thread(target=kv.get, args=("k",))
            thread.start()
            thread.join()
        gc.collect()
        assert len(kv._connections) <= 1  # (the main thread's)
        assert kv.get("k") == "v"


# System call numbers of read and recvfrom, by machine (/proc/PID/task/TID/syscall).
_RECEIVE_SYSCALLS = {"x86_64": {"0", "45"}, "aarch64": {"63", "207"}}


def receiving(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked in a receive (a call sent, its reply awaited)."""
    numbers = _RECEIVE_SYSCALLS.get(os.uname().machine)
    if numbers is None:
        pytest.skip(f"receive system call numbers of {os.uname().machine} not known here")
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as file:
            return file.read().split()[0] in numbers
    except OSError:  # (ended meanwhile)
        return False


def test_close_during_a_write_says_it_may_have_been_applied(cluster: LocalCluster) -> None:
    """close() from another thread ends a write under way; the write may still be applied
    (here it is, once the stalled backup resumes), so the error must not say definite."""
    backup = cluster.wait_for("backup")
    assert backup.pid is not None
    kv = kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=30)
    kv.put("k", "old")
    raised: list[BaseException] = []

    def write() -> None:
        try:
            kv.put("k", "new")
        except kvstore.KVError as exc:
            raised.append(exc)

    os.kill(backup.pid, signal.SIGSTOP)
    try:
        writer = threading.Thread(target=write)
        writer.start()
        # (the put went out and waits for its reply, which waits for the stopped backup)
        wait_until(lambda: receiving(writer) or None, 10.0, "the put was never sent")
        kv.close()
        writer.join(10)
    finally:
        os.kill(backup.pid, signal.SIGCONT)
    assert len(raised) == 1 and isinstance(raised[0], kvstore.UnavailableError)
    assert raised[0].is_definite is False
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=20) as other:
        assert wait_until(lambda: other.get("k") == "new" or None, 10.0, "not applied")


def test_a_forked_child_follows_a_failover(cluster: LocalCluster) -> None:
    """The parent's ZooKeeper session does not work in a child (its threads stay behind):
    the child opens its own, so it finds the new primary (the old one stays dead: no node
    there names the new one in a NotPrimary answer)."""
    with kvstore.Client(cluster.zk_connect, cluster.zk_path, timeout=10) as kv:
        kv.put("k", "v")
        go_read, go_write = os.pipe()
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: read once, wait for the failover, read again
            code = 1
            try:
                kv.get("k")
                os.read(go_read, 1)
                code = 0 if kv.get("k") == "v" else 1
            finally:
                os.write(writer, bytes([code]))
                os._exit(0)
        old = cluster.wait_for("primary")
        old.kill()
        assert cluster.wait_for("primary").address != old.address
        os.write(go_write, b"x")
        assert os.read(reader, 1) == b"\x00"
        os.waitpid(pid, 0)


def test_a_forked_child_closes_at_once_and_leaves_the_parent_alone(
    shared_cluster: LocalCluster,
) -> None:
    """A child's close() neither waits for the parent's ZooKeeper threads (not in the child)
    nor shuts the sockets it inherited, which the parent goes on using."""
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=5) as kv:
        kv.put("k", "v")
        parent_socket = kv._local.conn.raw_socket
        assert parent_socket is not None
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            is_quick = False
            try:
                began = time.monotonic()
                kv.close()
                is_quick = time.monotonic() - began < 2
            finally:
                os.write(writer, bytes([is_quick]))
                os._exit(0)
        assert os.read(reader, 1) == b"\x01"
        os.waitpid(pid, 0)
        assert not select.select([parent_socket], [], [], 0)[0]  # (not shut by the child)


def test_keys_must_be_str(shared_cluster: LocalCluster) -> None:
    """bytes would travel as their text, so get_many would look the answer up under another
    key and report a stored key missing."""
    with kvstore.Client(shared_cluster.zk_connect, shared_cluster.zk_path, timeout=5) as kv:
        kv.put("bk", "v")
        for call in (
            lambda: kv.get_many([b"bk"]),
            lambda: kv.get(b"bk"),
            lambda: kv.put(b"bk", "w"),
            lambda: kv.get_many("bk"),
        ):
            with pytest.raises(kvstore.BadRequestError):
                call()
        assert kv.get("bk") == "v"


def test_a_timeout_must_end_before_the_exactly_once_records_expire() -> None:
    from kvstore.client.client import MAX_TIMEOUT_S
    from kvstore.server.sessions import DEFAULT_TTL_S

    assert MAX_TIMEOUT_S < DEFAULT_TTL_S
    with pytest.raises(ValueError, match="exactly-once"):
        kvstore.Client("127.0.0.1:1", "/x", timeout=MAX_TIMEOUT_S + 1)


def test_status_probes_every_node_at_once(zk_server: ZooKeeperServer, zk_path: str) -> None:
    """Four registered nodes that accept a connection and never answer (paused ones) cost
    ``kv status`` one probe timeout, not four."""
    create_parent(zk_server.connect_string, zk_path)
    config = ClientConfig(zk_server.connect_string, zk_path)
    assert cluster_state(config, 1000)[1] == []  # (no node registered yet: none probed)
    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(4)]
    zk = connect(zk_server.connect_string, 10, 10)
    try:
        for listener in silent:
            host, port = listener.getsockname()
            zk.create(f"{zk_path}/node-", f"{host}:{port}".encode(), ephemeral=True, sequence=True)
        started = time.monotonic()
        _, reports = cluster_state(config, 1000)
        took = time.monotonic() - started
        assert [r.role for r in reports] == ["unreachable"] * 4
        assert all(r.error and "no reply in time" in r.error for r in reports), reports
        assert took < 2.5, took  # one after another: at least 4 s
        shown = subprocess.run(
            [sys.executable, "-m", "kvstore", "kv", "--zk", zk_server.connect_string,
             "--path", zk_path, "status"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert shown.returncode == 2, shown
        why = [line for line in shown.stdout.splitlines() if "did not answer" in line]
        assert len(why) == 4, shown.stdout  # each node's reason, not the first one's alone
    finally:
        zk.stop()
        zk.close()
        for listener in silent:
            listener.close()
