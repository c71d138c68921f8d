"""The write-ahead log and snapshots on real files: recovery, trimming, torn and corrupt
records, group commit."""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import SmallFilesystems
from kvstore import errors
from kvstore.local.processes import free_port, wait_until
from kvstore.local.zkserver import ZooKeeperServer
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


def recording_fsync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch os.fsync to record the size of each file it synced (after the real fsync)."""
    synced_sizes: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        size = os.fstat(fd).st_size
        real_fsync(fd)
        synced_sizes.append(size)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced_sizes


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


def test_a_snapshot_cut_short_by_a_crash_is_removed_when_the_node_starts(tmp_path: Path) -> None:
    """A kill -9 while a snapshot is written leaves its temporary file (up to the store's
    size, never read): the next start removes it and recovers from what was complete."""
    store = durable_store(tmp_path)
    fill(store)
    store.write_snapshot()
    expected = store.snapshot()
    store.log.close()  # type: ignore[union-attr]
    leftover = tmp_path / "snapshot.tmp"
    leftover.write_bytes(b"half a snapshot " * 1000)
    assert reopened(tmp_path).snapshot() == expected
    assert not leftover.exists()


def test_a_snapshot_keeps_each_clients_floor(tmp_path: Path) -> None:
    """A node that recovers from the snapshot alone (its log trimmed) still refuses a late
    retry of a request its client had moved past: applying it could apply it twice."""
    store = durable_store(tmp_path)
    store.wait_durable(store.apply_change("k", "v5", ("client", 5, True, 5)))
    store.wait_durable(store.apply_change("k", "v9", ("client", 9, True, 8)))  # past 5..7
    store.write_snapshot()
    store.log.close()  # type: ignore[union-attr]
    again = reopened(tmp_path)
    assert again.sessions_for("k").outcome("client", 9) is True
    with pytest.raises(errors.BadRequestError, match="moved past it"):
        again.sessions_for("k").outcome("client", 6)


def test_a_snapshot_record_of_an_earlier_version_reads_without_a_floor() -> None:
    """``R key client_id seq outcome``, as written before the floor was kept."""
    body = wal.RECORD + b"".join(len(t).to_bytes(4, "big") + t for t in (b"k", b"client"))
    body += (3).to_bytes(8, "big") + b"\0"
    mutation = wal.decode(body)
    assert (mutation.key, mutation.record, mutation.outcome) == ("k", ("client", 3, 0), False)
    current = wal.decode(wal.encode_record("k", "client", 3, False, 2)[12:])
    assert (current.key, current.record, current.outcome) == ("k", ("client", 3, 2), False)


def test_a_second_snapshot_waits_for_the_one_being_written(tmp_path: Path) -> None:
    """The snapshot loop and a joining backup's copy both take snapshots. Two at once shared
    the temporary file, and the second to finish dropped the segment the first still needed:
    a backup's files then refused to start (a damaged snapshot) or lacked acknowledged writes."""
    store = durable_store(tmp_path)
    fill(store)
    log = store.log
    assert log is not None
    first = log.segment + 1
    failures: list[Exception] = []

    def snapshot() -> None:
        try:
            store.write_snapshot()
        except Exception as exc:
            failures.append(exc)

    stripe_lock, _ = store.stripe_for_write("k1")
    with stripe_lock:  # the first snapshot stops at this stripe, its file half written
        one = threading.Thread(target=snapshot)
        one.start()
        wait_until(lambda: log.segment == first or None, 10, lambda: "no snapshot began")
        two = threading.Thread(target=snapshot)
        two.start()
        two.join(timeout=0.5)  # it must not switch segments meanwhile
        assert log.segment == first, "a second snapshot began while one was being written"
        for i in range(1, 100, 3):  # writes that the first snapshot may have missed
            if store.stripe_for_write(f"k{i}")[0] is not stripe_lock:
                store.wait_durable(store.put(f"k{i}", "after"))
    one.join(timeout=10)
    two.join(timeout=10)
    assert not failures
    assert not one.is_alive() and not two.is_alive()
    expected = store.snapshot()
    log.close()
    assert reopened(tmp_path).snapshot() == expected


@pytest.mark.parametrize("with_snapshot", [False, True], ids=["log", "snapshot+log"])
def test_a_missing_segment_refuses_to_start(tmp_path: Path, with_snapshot: bool) -> None:
    """Segments are numbered one after the other: recovering past a missing one would
    silently drop the writes it held."""
    store = durable_store(tmp_path)
    if with_snapshot:
        store.wait_durable(store.put("before", "snapshot"))
        store.write_snapshot()
    for i in range(3):  # each run of the log appends to a new segment
        store.wait_durable(store.put(f"k{i}", "v"))
        store.log.close()  # type: ignore[union-attr]
        store = reopened(tmp_path)
    segments = store.log.segments()  # type: ignore[union-attr]
    store.log.close()  # type: ignore[union-attr]
    assert_refused_without_segment(tmp_path, segments[1])
    (tmp_path / wal.INCOMPLETE_FILE).write_text("reset\n")  # a reset cut short: thrown away
    assert reopened(tmp_path).log.is_complete_copy is False  # type: ignore[union-attr]


@pytest.mark.parametrize("with_snapshot", [False, True], ids=["log", "snapshot+log"])
def test_a_missing_newest_segment_refuses_to_start(tmp_path: Path, with_snapshot: bool) -> None:
    """A gap shows between the segments present; a lost newest one (or every one after the
    snapshot) only against the directory's record of the newest it opened: recovering
    without it would lose every write it held, silently (an operator found 200 keys gone)."""
    store = durable_store(tmp_path)
    if with_snapshot:
        store.wait_durable(store.put("before", "snapshot"))
        store.write_snapshot()
    store.wait_durable(store.put("k", "v"))
    newest = store.log.segment  # type: ignore[union-attr]
    store.log.close()  # type: ignore[union-attr]
    assert_refused_without_segment(tmp_path, newest)


def assert_refused_without_segment(directory: Path, segment: int) -> None:
    """Delete ``segment``: recovery must refuse, naming it."""
    (directory / f"wal-{segment:08d}.log").unlink()
    store = StripedStore(8)
    store.log = WriteAheadLog(directory)
    with pytest.raises(wal.CorruptLogError, match=f"log segment\\(s\\) {segment} missing"):
        store.recover()
    store.log.close()


def test_starts_that_write_nothing_leave_no_segment_behind(tmp_path: Path) -> None:
    """Each start opens a segment for its appends; one that appended nothing removes it
    when it closes. A node refused at every start (systemd restarts it every 5 s) left one
    empty segment per start."""
    store = durable_store(tmp_path)
    store.wait_durable(store.put("k", "v"))
    store.log.close()  # type: ignore[union-attr]
    segments = sorted(tmp_path.glob("wal-*.log"))
    for _ in range(3):
        reopened(tmp_path).log.close()  # type: ignore[union-attr]
    assert sorted(tmp_path.glob("wal-*.log")) == segments
    assert reopened(tmp_path).snapshot() == {"k": "v"}


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
    synced_sizes = recording_fsync(monkeypatch)
    synced_sizes.append(0)
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


def test_a_failed_fsync_fails_its_writes_and_every_later_one_even_if_fsync_works_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After EIO the kernel may have dropped the pages and a later fsync of the same file
    succeeds: a write appended before it may not be on disk, so the log stays broken."""
    store = durable_store(tmp_path)
    real_fsync = os.fsync

    def failing(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    first = store.put("k", "lost?")
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(errors.ReplicationFailedError, match="could not be synced"):
        store.wait_durable(first)
    monkeypatch.setattr(os, "fsync", real_fsync)
    with pytest.raises(errors.KVError, match=r"failed earlier|could not be synced"):
        store.wait_durable(store.put("k", "later"))


def test_an_fsync_asked_for_soon_signals_its_descriptor_once_the_writes_are_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the event front waits for beside the backups' replies (server/node.py)."""
    store = durable_store(tmp_path)
    synced_sizes = recording_fsync(monkeypatch)
    position = store.put_many([f"k{i}" for i in range(50)], ["v"] * 50)
    delivery = store.sync_soon(position)
    assert delivery is not None
    readable, _, _ = select.select([delivery], [], [], 10)
    assert readable == [delivery]
    delivery.finish()
    assert synced_sizes and synced_sizes[-1] >= position  # a new segment: position = size
    fsyncs = len(synced_sizes)
    store.wait_durable(position)  # nothing left to sync
    assert store.sync_soon(position) is None
    assert len(synced_sizes) == fsyncs
    store.log.close()  # type: ignore[union-attr]
    assert reopened(tmp_path).get("k49") == "v"


def test_a_failed_fsync_asked_for_soon_still_signals_and_the_writes_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = durable_store(tmp_path)
    position = store.put("k", "lost?")

    def failing(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    delivery = store.sync_soon(position)
    assert delivery is not None
    assert select.select([delivery], [], [], 10)[0] == [delivery]
    delivery.finish()
    with pytest.raises(errors.ReplicationFailedError, match="could not be synced"):
        store.wait_durable(position)


def test_closing_the_log_ends_its_syncer_and_a_later_ask_is_answered_at_once(
    tmp_path: Path,
) -> None:
    store = durable_store(tmp_path)
    log = store.log
    assert log is not None
    before = set(threading.enumerate())
    delivery = store.sync_soon(store.put("k", "v"))
    assert delivery is not None
    delivery.finish()
    (syncer,) = [t for t in set(threading.enumerate()) - before if t.name == "wal-syncer"]
    log.close()
    syncer.join(10)
    assert not syncer.is_alive()
    assert delivery.fileno() == -1  # the syncer closed its eventfd as it ended
    # (appends refuse after close; a position not yet synced stands for one in flight)
    assert log.sync_soon(log.position + 1) is None  # the caller's wait_durable says why
    with pytest.raises(errors.ReplicationFailedError, match="closed"):
        log.wait_durable(log.position + 1)


def test_the_fsyncs_asked_for_soon_share_one_descriptor_quiet_between_them(
    tmp_path: Path,
) -> None:
    """The event front keeps it registered (rpc/front.py): readable once per fsync."""
    store = durable_store(tmp_path)
    first = store.sync_soon(store.put("k", "v"))
    assert first is not None
    assert select.select([first], [], [], 10)[0] == [first]
    first.finish()
    assert select.select([first], [], [], 0)[0] == []  # taken: quiet until the next one
    second = store.sync_soon(store.put("k", "w"))
    assert second is not None and second.fileno() == first.fileno()
    assert select.select([second], [], [], 10)[0] == [second]
    second.finish()
    assert select.select([second], [], [], 0)[0] == []
    third = store.sync_soon(store.put("k", "x"))
    assert third is not None
    third.finish()  # without waiting for the descriptor first: it waits for the fsync
    assert select.select([third], [], [], 0)[0] == []


def test_a_batch_of_puts_is_logged_whole_or_not_at_all(
    small_filesystems: SmallFilesystems,
) -> None:
    """A backup applies a replicated batch with one append: on a full disk none of it
    is applied, and what was acknowledged before stays."""
    directory = small_filesystems.mount(1 << 20)
    store = durable_store(directory)
    store.wait_durable(store.put("kept", "v"))
    big = "x" * 200_000
    with pytest.raises(errors.DiskFullError):
        store.put_many([f"big{i}" for i in range(8)], [big] * 8)
    assert all(store.get(f"big{i}") is None for i in range(8))
    store.log.close()  # type: ignore[union-attr]
    again = reopened(directory)
    assert again.get("kept") == "v"
    assert again.get("big0") is None


def test_a_group_whose_fsync_fails_after_its_append_is_not_reported_as_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --fsync always the records are in the file before the fsync fails: a write
    that may come back after a restart must not be answered "definitely not applied"."""
    store = durable_store(tmp_path, fsync="always")

    def failing(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    positions, failure = store.log_writes([("a", "1", None), ("b", "2", None)])
    assert positions == []
    assert isinstance(failure, errors.KVError)
    assert not failure.is_definite


def test_a_group_too_big_for_the_disk_logs_the_writes_before_the_one_that_does_not_fit(
    small_filesystems: SmallFilesystems,
) -> None:
    directory = small_filesystems.mount(1 << 20)
    store = durable_store(directory)
    small, big = "s" * 100_000, "x" * 2_000_000
    mutations: list[tuple[str, str | None, None]] = [("a", small, None), ("b", big, None)]
    positions, failure = store.log_writes(mutations)
    assert positions == []  # whole or nothing (a backup's batch)
    assert isinstance(failure, errors.DiskFullError)
    positions, failure = store.log_writes([*mutations, ("c", small, None)], may_split=True)
    assert len(positions) == 1
    assert isinstance(failure, errors.DiskFullError)
    assert failure.is_definite
    store.wait_durable(positions[0])


def test_without_a_syncer_thread_the_caller_syncs_and_a_later_ask_gets_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = durable_store(tmp_path)
    real_start = threading.Thread.start

    def refuse(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    first = store.put("k", "v")
    assert store.sync_soon(first) is None
    store.wait_durable(first)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    delivery = store.sync_soon(store.put("k", "w"))
    assert delivery is not None
    assert select.select([delivery], [], [], 10)[0] == [delivery]
    delivery.finish()


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


def test_a_full_disk_refuses_appends_and_snapshots_and_keeps_everything_acknowledged(
    small_filesystems: SmallFilesystems,
) -> None:
    directory = small_filesystems.mount(1 << 20)
    store = durable_store(directory)
    fill(store)
    store.write_snapshot()
    store.wait_durable(store.put("after", "snapshot"))
    expected = store.snapshot()
    log = store.log
    assert log is not None
    snapshot = (directory / wal.SNAPSHOT_FILE).read_bytes()
    ballast = small_filesystems.fill(directory)

    # An append that does not fit, wholly or in part, leaves nothing behind.
    for size in (5_000, 50_000):  # more than the slack in the last page of the segment
        with pytest.raises(errors.DiskFullError, match="disk full"):
            store.put(f"big-{size}", "x" * size)
        assert store.get(f"big-{size}") is None
    segments = log.segments()
    with pytest.raises(errors.DiskFullError, match="previous snapshot and the log are kept"):
        store.write_snapshot()
    assert (directory / wal.SNAPSHOT_FILE).read_bytes() == snapshot
    assert not (directory / (wal.SNAPSHOT_FILE + ".tmp")).exists()
    assert set(segments) <= set(log.segments())
    assert log.snapshot_room() is not None  # the node skips them now (they would fail writes)

    ballast.unlink()  # space freed: writes and snapshots resume, no restart
    store.wait_durable(store.put("freed", "v"))
    store.write_snapshot()
    store.wait_durable(store.put("last", "v"))
    expected.update(freed="v", last="v")
    log.close()
    assert reopened(directory).snapshot() == expected


def test_a_range_of_positions_reads_back_in_order_and_a_pin_keeps_it_past_snapshots(
    tmp_path: Path,
) -> None:
    store = durable_store(tmp_path)
    fill(store)
    log = store.log
    assert log is not None
    start = log.position
    for i in range(5):
        store.wait_durable(store.apply_change(f"r{i}", None if i == 3 else f"v{i}"))
    records, after = log.read_range(start, log.position, max_bytes=1 << 20)
    assert [(m.key, m.value) for _, _, m in wal.scan(records, "test")] == [
        ("r0", "v0"), ("r1", "v1"), ("r2", "v2"), ("r3", None), ("r4", "v4"),
    ]  # fmt: skip
    assert after == log.position
    first, after_first = log.read_range(start, log.position, max_bytes=1)  # at least one
    assert len(list(wal.scan(first, "test"))) == 1
    assert after_first == start + len(first)

    log.pin("join", start)
    store.write_snapshot()
    assert log.covers(start)
    assert len(list(wal.scan(log.read_range(start, log.position, 1 << 20)[0], "test"))) == 5
    log.unpin("join")
    store.write_snapshot()
    assert not log.covers(start)
    with pytest.raises(CorruptLogError):
        log.read_range(start, log.position, 1 << 20)


def test_a_marker_survives_snapshots_and_restarts_and_a_reset_voids_it(tmp_path: Path) -> None:
    store = durable_store(tmp_path)
    fill(store)
    store.wait_durable(store.log_marker((3, "primary-log", 1234)))
    store.write_snapshot()  # the marker goes into the snapshot
    store.wait_durable(store.put("after", "marker"))
    store.log.close()  # type: ignore[union-attr]
    again = reopened(tmp_path)
    assert again.log is not None
    assert again.log.marker == (3, "primary-log", 1234)
    assert again.log.is_complete_copy

    again.begin_catch_up()  # a catch-up cut short: incomplete, but the marker still holds
    again.log.close()
    cut_short = reopened(tmp_path)
    assert cut_short.log is not None
    assert cut_short.log.marker == (3, "primary-log", 1234)
    assert not cut_short.log.is_complete_copy

    # A crash in the middle of a reset (the flag written, the old files not yet removed).
    (tmp_path / wal.INCOMPLETE_FILE).write_text("reset\n")
    cut_short.log.close()
    voided = reopened(tmp_path)
    assert voided.log is not None
    assert voided.log.marker is None
    assert not voided.log.is_complete_copy
    voided.clear()
    voided.log.mark_complete()
    voided.log.close()
    assert reopened(tmp_path).log.is_complete_copy  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("keys", "values"),
    [
        ([], []),
        (["a", "b"], ["1", ""]),
        (["é", "日本"], ["ü", "x" * 1000]),
        (["nul\0key", ""], ["v", "nul\0value"]),  # a NUL in the text: lengths are stored
    ],
)
def test_a_bulk_record_round_trips(keys: list[str], values: list[str]) -> None:
    data = wal.encode_bulk(keys, values)
    assert wal.decode(data[12:]).bulk == (keys, values)


def test_a_snapshot_of_single_records_still_recovers(tmp_path: Path) -> None:
    """Snapshots written before bulk records (one record per key) load as before."""
    (tmp_path / "wal-00000001.log").write_bytes(wal.encode("in-log", "v"))
    records = [wal.encode(f"k{i}", f"v{i}") for i in range(10)]
    records.append(wal.encode_record("k1", "client", 3, True))
    header = wal.frame(wal.SNAPSHOT_HEADER + (1).to_bytes(8, "big"))
    (tmp_path / wal.SNAPSHOT_FILE).write_bytes(header + b"".join(records))
    store = durable_store(tmp_path)
    assert store.snapshot() == {"in-log": "v", **{f"k{i}": f"v{i}" for i in range(10)}}
    assert store.sessions_for("k1").outcome("client", 3) is True


def test_a_new_node_id_keeps_the_ones_before_as_the_directorys_own(tmp_path: Path) -> None:
    """Each listing takes a new id (a copy of the directory made before keeps an older one);
    the last FORMER_IDS_KEPT stay this directory's, across restarts."""
    log = WriteAheadLog(tmp_path)
    first = log.node_id
    ids = [first] + [log.new_node_id() for _ in range(wal.FORMER_IDS_KEPT + 1)]
    assert len(set(ids)) == len(ids)
    assert log.node_ids == frozenset(ids[-wal.FORMER_IDS_KEPT - 1 :])  # the oldest one gone
    log.close()
    again = WriteAheadLog(tmp_path)
    assert (again.node_id, again.node_ids) == (ids[-1], log.node_ids)
    again.close()


def test_a_data_directory_serves_one_node_at_a_time(tmp_path: Path) -> None:
    first = WriteAheadLog(tmp_path)
    with pytest.raises(errors.DataDirectoryInUseError, match=f"process {os.getpid()}"):
        WriteAheadLog(tmp_path)
    first.close()
    WriteAheadLog(tmp_path).close()  # released with its log


def test_a_second_kv_node_on_a_data_directory_in_use_refuses_to_start(
    tmp_path: Path, zk_server: ZooKeeperServer
) -> None:
    holder = WriteAheadLog(tmp_path / "data")
    try:
        started = subprocess.run(
            [sys.executable, "-m", "kvstore", "node", "127.0.0.1", str(free_port()),
             zk_server.connect_string, "/shared-dir", "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        holder.close()
    assert started.returncode == 1
    assert f"in use by another node (process {os.getpid()})" in started.stderr
    assert "Traceback" not in started.stderr


def test_flat_records_of_a_backup_batch_are_logged_and_recovered(tmp_path: Path) -> None:
    """put_many logs the exactly-once records that travel flat beside a batch's entries
    (only with a log: in memory it records them without building a tuple for each)."""
    store = durable_store(tmp_path)
    store.wait_durable(store.put_many(["a", "b"], ["1", "2"], (["", "lane-1"], [0, 7], [0, 6])))
    assert store.log is not None
    store.log.close()
    again = reopened(tmp_path)
    assert again.snapshot() == {"a": "1", "b": "2"}
    assert again.sessions_for("b").outcome("lane-1", 7) is True
    assert sum(len(table) for table in again.sessions) == 1
