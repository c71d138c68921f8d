"""StripedStore: the map, its stripes, snapshots and put-if-absent (no network)."""

from __future__ import annotations

import threading

import pytest

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
        keys, values, stripe = store.snapshot_stripes(stripe, max_entries)
        assert not set(keys) & set(copied), "a key was copied twice"
        copied.update(zip(keys, values, strict=True))
        chunks += 1
        assert chunks <= 16, "more chunks than stripes"
    assert copied == expected
    assert store.snapshot() == expected


def test_snapshot_of_empty_store_ends() -> None:
    keys, values, next_stripe = StripedStore(4).snapshot_stripes(0, 10)
    assert (keys, values, next_stripe) == ([], [], -1)


def test_clear_empties_every_stripe() -> None:
    store = StripedStore(4)
    store.put_many([f"k{i}" for i in range(50)], ["v"] * 50)
    store.clear()
    assert len(store) == 0
    assert store.snapshot() == {}


def test_stripe_write_lock_excludes_readers_of_that_stripe() -> None:
    store = StripedStore(1)  # one stripe: every key shares the lock
    store.put("k", "old")
    lock, shard = store.stripe_for_write("k")
    seen: list[str | None] = []
    with lock:
        reader = threading.Thread(target=lambda: seen.append(store.get("k")))
        reader.start()
        reader.join(timeout=0.2)
        assert reader.is_alive(), "a reader got past the write lock"
        shard["k"] = "new"
    reader.join(timeout=5)
    assert seen == ["new"]


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
