"""The write-ahead log and snapshots on real files: recovery, trimming, torn and corrupt
records, group commit."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from kvstore.server import wal
from kvstore.server.storage import StripedStore
from kvstore.server.wal import CorruptLogError, WriteAheadLog


def durable_store(directory: Path, fsync: str = "batch") -> StripedStore:
    store = StripedStore(8)
    store.log = WriteAheadLog(directory, fsync)
    store.recover()
    return store


def fill(store: StripedStore) -> None:
    store.wait_durable(store.put_many([f"k{i}" for i in range(100)], ["v"] * 100))
    for i in range(0, 100, 3):
        store.wait_durable(store.apply_change(f"k{i}", None))
    store.wait_durable(store.apply_change("k1", "changed", ("client", 7, True, 1)))


def reopened(directory: Path) -> StripedStore:
    store = durable_store(directory)
    assert store.log is not None
    return store


def test_the_store_comes_back_after_a_restart(tmp_path: Path) -> None:
    store = durable_store(tmp_path)
    fill(store)
    expected = store.snapshot()
    store.log.close()  # type: ignore[union-attr]
    again = reopened(tmp_path)
    assert again.snapshot() == expected
    assert again.sessions_for("k1").outcome("client", 7) is True
    assert again.log.node_id == store.log.node_id  # type: ignore[union-attr]


def test_a_snapshot_trims_the_log_and_recovery_replays_what_came_after(tmp_path: Path) -> None:
    store = durable_store(tmp_path)
    fill(store)
    old_segments = store.log.segments()  # type: ignore[union-attr]
    store.write_snapshot()
    store.wait_durable(store.put("after", "snapshot"))
    store.wait_durable(store.apply_change("k2", None))
    expected = store.snapshot()
    assert not set(old_segments) & set(store.log.segments())  # type: ignore[union-attr]
    store.log.close()  # type: ignore[union-attr]
    assert reopened(tmp_path).snapshot() == expected


def test_a_torn_last_record_is_cut_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = durable_store(tmp_path)
    fill(store)
    expected = store.snapshot()
    log = store.log
    assert log is not None
    segment = log.segment_path(log.segment)
    log.close()
    with open(segment, "ab") as file:
        file.write(wal.encode("torn", "x" * 100)[:30])  # a crash in the middle of an append
    with caplog.at_level(logging.WARNING):
        assert reopened(tmp_path).snapshot() == expected
    assert "torn last record" in caplog.text


def test_a_damaged_record_before_the_end_refuses_to_start(tmp_path: Path) -> None:
    store = durable_store(tmp_path)
    fill(store)
    log = store.log
    assert log is not None
    segment = log.segment_path(log.segment)
    log.close()
    data = bytearray(segment.read_bytes())
    data[20] ^= 0xFF  # inside the first record; many follow it
    segment.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match=rf"{segment.name} is damaged at offset 0"):
        durable_store(tmp_path)


def test_concurrent_writers_share_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = durable_store(tmp_path)
    writers = 8
    appended = threading.Barrier(writers)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))

    def write(i: int) -> None:
        position = store.put(f"k{i}", "v")
        appended.wait(timeout=10)  # every writer appended before anyone syncs
        store.wait_durable(position)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(fsyncs) == 1


def test_a_write_is_durable_when_wait_durable_returns_however_the_rounds_fall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit under contention: every wait_durable returns only after an fsync that
    began when the file already held the write (the segment is new: position = size)."""
    store = durable_store(tmp_path)
    synced_sizes = [0]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        size = os.fstat(fd).st_size
        real_fsync(fd)
        synced_sizes.append(size)

    monkeypatch.setattr(os, "fsync", fsync)
    late: list[tuple[int, int]] = []

    def write(i: int) -> None:
        for j in range(40):
            position = store.put(f"k{i}-{j}", "v")
            store.wait_durable(position)
            if max(synced_sizes) < position:
                late.append((position, max(synced_sizes)))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert late == []
    assert 1 < len(synced_sizes) <= 8 * 40


def test_a_failed_fsync_fails_every_write_it_was_for_and_the_next_one_syncs_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = durable_store(tmp_path)
    real_fsync = os.fsync

    def failing(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output"):
        store.wait_durable(store.put("k", "lost?"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    store.wait_durable(store.put("k", "kept"))


def test_clearing_the_store_forgets_the_disk_copy(tmp_path: Path) -> None:
    store = durable_store(tmp_path)
    fill(store)
    store.write_snapshot()
    assert store.log is not None and store.log.is_complete_copy
    store.clear()  # a join begins: the copy on disk is void
    assert not store.log.is_complete_copy
    store.wait_durable(store.put("forwarded", "v"))
    store.log.close()
    assert reopened(tmp_path).snapshot() == {"forwarded": "v"}
