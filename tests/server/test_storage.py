"""StripedStore: the map, its stripes, snapshots and put-if-absent (no network)."""

from __future__ import annotations

import threading
import time

import pytest

from kvstore import errors
from kvstore.server import wal
from kvstore.server.sessions import SessionTable
from kvstore.server.storage import StripedStore


def test_get_put_and_missing_key() -> None:
    store = StripedStore(8)
    assert store.get("a") is None
    store.put("a", "1")
    store.put("a", "2")
    assert store.get("a") == "2"
    assert len(store) == 1


def test_put_many_applies_in_order() -> None:
    store = StripedStore(4)
    store.put_many(["k", "j", "k"], ["first", "x", "second"])
    assert store.get("k") == "second"
    assert store.get("j") == "x"


def test_put_many_remembers_the_records_that_travel_flat_beside_the_entries() -> None:
    store = StripedStore(4)
    store.put_many(["a", "b"], ["1", "2"], (["", "lane-1"], [0, 7], [0, 7]))
    assert store.snapshot() == {"a": "1", "b": "2"}
    assert store.sessions_for("b").outcome("lane-1", 7) is True
    assert sum(len(table) for table in store.sessions) == 1  # "" is a put without one


@pytest.mark.parametrize("records", [None, (["lane-1"], [5], [5])], ids=["plain", "flat"])
def test_a_replayed_older_value_never_overwrites_one_forwarded_during_the_catch_up(
    records: tuple[list[str], list[int], list[int]] | None,
) -> None:
    """Forwarded writes, with or without flat exactly-once records, mark their keys: the
    catch-up replay of the primary's log skips those, whose value is newer."""
    store = StripedStore(4)
    store.begin_catch_up()
    store.put_many(["k"], ["new"], records)
    old = wal.encode("k", "old", ("lane-1", 4, 4)) + wal.encode("j", "replayed")
    store.replay_untouched(old, "a test chunk")
    assert store.snapshot() == {"k": "new", "j": "replayed"}
    # the replayed record set the client's floor: a late attempt of 3 is refused
    with pytest.raises(errors.BadRequestError):
        store.sessions_for("k").outcome("lane-1", 3)


def test_put_if_absent_never_overwrites_forwarded_values() -> None:
    store = StripedStore(4)
    store.put("fresh", "forwarded")
    inserted = store.put_if_absent_many(["fresh", "old"], ["stale snapshot", "copied"])
    assert inserted == 1
    assert store.get("fresh") == "forwarded"
    assert store.get("old") == "copied"


@pytest.mark.parametrize("max_entries", [1, 7, 1000])
def test_snapshot_stripes_covers_every_key_exactly_once(max_entries: int) -> None:
    store = StripedStore(16)
    expected = {f"key-{i}": f"value-{i}" for i in range(200)}
    for key, value in expected.items():
        store.put(key, value)
    copied: dict[str, str] = {}
    stripe, chunks = 0, 0
    while stripe != -1:
        keys, values, _, stripe = store.snapshot_stripes(stripe, max_entries)
        assert not set(keys) & set(copied), "a key was copied twice"
        copied.update(zip(keys, values, strict=True))
        chunks += 1
        assert chunks <= 16, "more chunks than stripes"
    assert copied == expected
    assert store.snapshot() == expected


def test_snapshot_of_empty_store_ends() -> None:
    assert StripedStore(4).snapshot_stripes(0, 10) == ([], [], [], -1)


def test_clear_empties_every_stripe() -> None:
    store = StripedStore(4)
    store.put_many([f"k{i}" for i in range(50)], ["v"] * 50)
    store.clear()
    assert len(store) == 0
    assert store.snapshot() == {}


def test_a_write_in_flight_is_invisible_to_readers_who_do_not_wait_but_snapshots_do() -> None:
    store = StripedStore(1)  # one stripe: every key shares the lock
    store.put("k", "old")
    lock, shard = store.stripe_for_write("k")
    copies: list[dict[str, str]] = []
    with lock:  # a writer replicating and logging: nothing published yet
        assert store.get("k") == "old"
        assert store.get_many(["k", "x"]) == {"k": "old"}
        copier = threading.Thread(target=lambda: copies.append(store.snapshot()))
        copier.start()
        copier.join(timeout=0.2)
        assert copier.is_alive(), "a snapshot copied a stripe while its writer held it"
        shard["k"] = "new"  # published
        assert store.get("k") == "new"
    copier.join(timeout=5)
    assert copies == [{"k": "new"}]


def test_concurrent_writers_lose_nothing() -> None:
    store = StripedStore(8)

    def write(prefix: str) -> None:
        for i in range(2000):
            store.put(f"{prefix}-{i}", str(i))

    threads = [threading.Thread(target=write, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(store) == 8000


def test_stripe_count_must_be_positive() -> None:
    with pytest.raises(ValueError):
        StripedStore(0)


def test_exactly_once_records_travel_with_the_stripe_snapshot() -> None:
    primary = StripedStore(8)
    primary.apply_change("k", "v", ("client", 5, True, 4))
    _, _, records, _ = primary.snapshot_stripes(0, 1000)
    assert records == [("k", "client", 5, True, 4)]  # with the client's floor
    backup = StripedStore(3)  # another stripe count (and hash seed) than the primary's
    backup.add_records(records)
    assert backup.sessions_for("k").outcome("client", 5) is True
    assert backup.sessions_for("k").outcome("client", 6) is None
    with pytest.raises(errors.BadRequestError):  # a late retry the client moved past
        backup.sessions_for("k").outcome("client", 3)


def test_a_deleted_key_is_not_brought_back_by_an_older_copy_during_a_join() -> None:
    store = StripedStore(4)
    store.clear()  # a join begins
    store.apply_change("gone", None)  # a forwarded delete
    store.apply_change("kept", "new")  # a forwarded put
    assert store.put_if_absent_many(["gone", "kept", "other"], ["old", "old", "x"]) == 1
    assert store.snapshot() == {"kept": "new", "other": "x"}
    store.forget_touched()  # the copy is complete
    assert store.put_if_absent_many(["gone"], ["later"]) == 1


def test_records_below_what_the_client_still_awaits_are_dropped() -> None:
    table = SessionTable()
    table.record("k1", "c", 1, True, acked_below=1)
    table.record("k2", "c", 2, False, acked_below=1)
    assert len(table) == 2
    table.record("k3", "c", 3, True, acked_below=3)  # 1 and 2 were answered
    for seq in (1, 2):  # gone, and refused should a late attempt of either come
        with pytest.raises(errors.BadRequestError):
            table.outcome("c", seq)
    assert table.outcome("c", 3) is True
    assert list(table.items()) == [("k3", "c", 3, True, 3)]


def test_records_copied_from_a_snapshot_are_kept_until_the_client_has_its_answer() -> None:
    table = SessionTable()
    table.add_if_absent("k1", "c", 10, True)  # state transfer
    table.record("k2", "c", 11, True, acked_below=5)  # 10 may still be retried
    assert table.outcome("c", 10) is True
    table.record("k3", "c", 12, True, acked_below=12)
    assert list(table.items()) == [("k3", "c", 12, True, 12)]


def test_a_late_attempt_of_a_request_the_client_moved_past_is_refused_not_applied() -> None:
    """Attempt 1 of seq 5 was applied (reply lost), attempt 2 was held up until the client
    timed out, and the client's seq 6 to the same stripe dropped 5's record: attempt 2
    must not apply 5 a second time."""
    table = SessionTable()
    table.record("k", "c", 5, True, acked_below=5)
    table.record("k", "c", 6, True, acked_below=6)
    with pytest.raises(errors.BadRequestError, match="moved past it"):
        table.outcome("c", 5)
    assert table.outcome("c", 6) is True
    assert table.outcome("c", 7) is None


def test_records_of_an_idle_client_expire() -> None:
    table = SessionTable(ttl_s=0.0)
    table.record("k", "idle", 1, True, acked_below=1)
    time.sleep(0.01)  # lets the monotonic clock move past the idle client's last write
    table.record("k", "busy", 1, True, acked_below=1)
    assert table.outcome("idle", 1) is None
    assert table.outcome("busy", 1) is True
