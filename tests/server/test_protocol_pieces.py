"""Wire-level pieces without a network: frame guard, error codes, metadata, fence and lease."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import types
from dataclasses import replace
from typing import Any, cast

import pytest

from kvstore import errors
from kvstore.config import Limits, NodeConfig
from kvstore.coordination import ClusterMeta, Member, designated_backups, is_member
from kvstore.idl import Change, NodeStatus
from kvstore.local.processes import wait_until
from kvstore.rpc import MalformedFrameError, RpcServer, _FrameReader, parse_address
from kvstore.server import follower, identity
from kvstore.server.handler import NodeHandler, NodeService, Write
from kvstore.server.node import StorageNode
from kvstore.server.replication import BackupFailedError, BackupFence, Replicator
from kvstore.server.roles import Role


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def frame_reader(data: bytes, max_frame_bytes: int = 100) -> _FrameReader:
    """A reader over a real socket pair whose other end sent ``data`` and closed."""
    ours, theirs = socket.socketpair()
    theirs.sendall(data)
    theirs.close()
    return _FrameReader(ours, max_frame_bytes, idle_timeout_s=5.0, deadline_s=5.0)


def test_reader_hands_out_one_frame_per_message() -> None:
    reader = frame_reader(frame(b"abc") + frame(b"de"))
    assert reader.next_frame() == frame(b"abc")
    assert reader.read(100) == frame(b"abc")  # never a byte of the next frame
    with pytest.raises(MalformedFrameError, match="past the end"):
        reader.read(100)  # the message wants more than its frame holds
    assert reader.next_frame() == frame(b"de")
    assert reader.read(2) == b"\x00\x00"
    assert reader.read(100) == b"\x00\x02de"


@pytest.mark.parametrize("size", [0, -1, 101, 2**31 - 1])
def test_reader_refuses_frames_out_of_bounds(size: int) -> None:
    reader = frame_reader(size.to_bytes(4, "big", signed=True) + b"xx")
    with pytest.raises(MalformedFrameError, match="refused"):
        reader.next_frame()


def test_reader_reports_eof_in_order() -> None:
    from thriftpy2.transport import TTransportException

    reader = frame_reader(b"\x00\x00")  # half a header, then the peer closed
    with pytest.raises(TTransportException) as caught:
        reader.next_frame()
    assert caught.value.type == TTransportException.END_OF_FILE


def test_error_codes_round_trip() -> None:
    for cls in (
        errors.NotPrimaryError,
        errors.UnavailableError,
        errors.TooLargeError,
        errors.BadRequestError,
        errors.StaleEpochError,
        errors.ReplicationFailedError,
        errors.DataLostError,
        errors.DiskFullError,
    ):
        rebuilt = errors.from_code(cls.code, "message")
        assert type(rebuilt) is cls
        assert rebuilt.is_definite == cls.is_definite
    assert not errors.ReplicationFailedError.is_definite
    assert errors.DiskFullError.is_definite  # refused before anything was applied
    assert isinstance(errors.from_code(999, "?"), errors.ProtocolError)


def test_not_primary_carries_the_hint() -> None:
    err = errors.from_code(errors.NotPrimaryError.code, "node x is backup. primary=127.0.0.1:9090")
    assert isinstance(err, errors.NotPrimaryError)
    assert err.primary_address == "127.0.0.1:9090"


def test_cluster_meta_round_trip_and_empty() -> None:
    meta = ClusterMeta(
        3, "node-0000000004", "127.0.0.1:9090", ("node-0000000004", "node-0000000005")
    )
    assert ClusterMeta.from_bytes(meta.to_bytes()) == meta
    assert not ClusterMeta.from_bytes(b"").is_initialized
    with pytest.raises(errors.CoordinationError):
        ClusterMeta.from_bytes(b"not json")


def test_the_replication_factor_travels_in_the_metadata_and_picks_the_backups() -> None:
    meta = ClusterMeta(replicas=3).alone(1, "node-0000000001", "127.0.0.1:9091")
    assert ClusterMeta.from_bytes(meta.to_bytes()).replicas == 3
    assert meta.alone(2, "node-0000000002", "127.0.0.1:9092").replicas == 3  # a takeover keeps it
    older = b'{"epoch": 2, "in_sync": [], "primary": "", "primary_address": ""}'
    assert ClusterMeta.from_bytes(older).replicas == 2  # written before N existed: the seed's
    # Out of range (a later version, a hand edit): brought into range, never unreadable.
    assert ClusterMeta.from_bytes(ClusterMeta(replicas=0).to_bytes()).replicas == 1
    assert ClusterMeta.from_bytes(ClusterMeta(replicas=40).to_bytes()).replicas == 9
    members = [Member(f"node-000000000{i}", f"127.0.0.1:{9090 + i}") for i in range(1, 6)]
    picked = designated_backups(members, "node-0000000002", 3)
    assert [m.name for m in picked] == ["node-0000000001", "node-0000000003"]
    assert designated_backups(members, "node-0000000001", 1) == []


def test_cluster_meta_keeps_the_addresses_of_in_sync_members() -> None:
    meta = (
        ClusterMeta()
        .alone(2, "node-0000000001", "127.0.0.1:9091")
        .with_in_sync(("node-0000000001", "node-0000000003"), {"node-0000000003": "127.0.0.1:9090"})
    )
    assert ClusterMeta.from_bytes(meta.to_bytes()) == meta
    assert meta.address_of("node-0000000003") == "127.0.0.1:9090"
    renamed = meta.renamed("node-0000000003", "node-0000000007")
    assert renamed.in_sync == ("node-0000000001", "node-0000000007")
    assert renamed.address_of("node-0000000007") == "127.0.0.1:9090"
    assert renamed.address_of("node-0000000003") is None
    alone = renamed.without_in_sync("node-0000000007", "node-0000000003")
    assert alone.addresses == (("node-0000000001", "127.0.0.1:9091"),)
    # Written before addresses were recorded: none known, the rest as before.
    old = b'{"epoch": 2, "in_sync": ["node-0000000001"], "primary": "node-0000000001", '
    old += b'"primary_address": "127.0.0.1:9091"}'
    assert ClusterMeta.from_bytes(old).address_of("node-0000000001") is None
    with pytest.raises(errors.CoordinationError):
        ClusterMeta.from_bytes(old[:-1] + b', "addresses": [1]}')


def test_a_join_at_a_listed_backups_address_must_show_its_certificate() -> None:
    """A backup that registered again has a new name at its old address, and a join there
    replaces it: the join must come from the certificate the backup is listed with, or
    another node certificate could strip it from the in-sync set (found by review)."""
    meta = ClusterMeta().alone(2, "node-0000000001", "127.0.0.1:9091", None, "sha256:aa")
    meta = meta.with_in_sync(
        ("node-0000000001", "node-0000000003"),
        {"node-0000000003": "127.0.0.1:9090"},
        identities={"node-0000000003": "sha256:bb"},
    )
    with pytest.raises(errors.ForbiddenError, match="lists node-0000000003 there"):
        identity.check_joiner(meta, [], "node-0000000009", "sha256:evil", address="127.0.0.1:9090")
    identity.check_joiner(meta, [], "node-0000000009", "sha256:bb", address="127.0.0.1:9090")
    identity.check_joiner(meta, [], "node-0000000009", "sha256:cc", address="127.0.0.1:9095")
    # ... and a join in progress at that address pinned its certificate too.
    joining = Replicator(Member("node-0000000005", "127.0.0.1:9095"), 2, "j", 1.0, 1000)
    joining.identity = "sha256:dd"
    with pytest.raises(errors.ForbiddenError, match="join in progress there"):
        identity.check_joiner(
            meta, [joining], "node-0000000009", "sha256:evil", address="127.0.0.1:9095"
        )
    identity.check_joiner(meta, [joining], "node-0000000009", "sha256:dd", address="127.0.0.1:9095")
    joining.close()


def test_cluster_meta_keeps_the_identities_of_in_sync_members() -> None:
    """Under TLS the primary lists each in-sync member with its certificate's identity;
    without TLS nothing is written (the JSON stays as it was)."""
    plain = ClusterMeta().alone(2, "node-0000000001", "127.0.0.1:9091")
    assert b"identities" not in plain.to_bytes() and plain.identity_of("node-0000000001") is None
    meta = ClusterMeta().alone(2, "node-0000000001", "127.0.0.1:9091", None, "sha256:aa")
    meta = meta.with_in_sync(
        ("node-0000000001", "node-0000000003"),
        {"node-0000000003": "127.0.0.1:9090"},
        identities={"node-0000000003": "sha256:bb"},
    )
    assert ClusterMeta.from_bytes(meta.to_bytes()) == meta
    assert meta.identity_of("node-0000000001") == "sha256:aa"
    assert meta.identity_of("node-0000000003") == "sha256:bb"
    renamed = meta.renamed("node-0000000003", "node-0000000007")
    assert renamed.identity_of("node-0000000007") == "sha256:bb"
    assert renamed.identity_of("node-0000000003") is None
    dropped = renamed.without_in_sync("node-0000000007")
    assert dropped.identities == (("node-0000000001", "sha256:aa"),)


def test_a_renamed_backup_is_dropped_under_every_name_it_may_be_listed_under() -> None:
    """A rename's CAS may land and still raise: the replicator knows both names before it."""
    replicator = Replicator(Member("node-0000000001", "127.0.0.1:9"), 1, "join-1", 1.0, 100)
    replicator.other_names.update(("node-0000000001", "node-0000000003"))
    assert replicator.names == ("node-0000000001", "node-0000000003")
    meta = ClusterMeta(1, "node-0000000000", "127.0.0.1:8", ("node-0000000000", "node-0000000003"))
    assert meta.without_in_sync(*replicator.names).in_sync == ("node-0000000000",)


def test_a_node_of_another_cluster_incarnation_is_not_a_member_of_the_same_name() -> None:
    """Names repeat across parents (every cluster's first node is node-0000000000): the
    incarnation a node reports tells them apart; one not known on either side does not."""
    status = NodeStatus(node_id="node-0000000000", role="primary", incarnation="abc")
    assert is_member(status, "node-0000000000", "abc")
    assert not is_member(status, "node-0000000000", "def")
    assert not is_member(status, "node-0000000001", "abc")
    assert is_member(status, "node-0000000000", "")  # (metadata of an earlier version)
    unknown = NodeStatus(node_id="node-0000000000", role="standby")  # none served yet
    assert is_member(unknown, "node-0000000000", "abc")


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9090") == ("127.0.0.1", 9090)
    for bad in ("127.0.0.1", ":9090", "host:port"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_fence_accepts_only_the_open_join_of_the_current_epoch() -> None:
    fence = BackupFence(lease_s=10.0)
    with fence.lock, pytest.raises(errors.StaleEpochError):
        fence.check(1, "join-a")  # nothing accepted before a join
    fence.open(1, "join-a")
    with fence.lock:
        fence.check(1, "join-a")
        for epoch, join_id in ((2, "join-a"), (None, "join-a"), (1, "join-b"), (1, None)):
            with pytest.raises(errors.StaleEpochError):
                fence.check(epoch, join_id)
    fence.open(1, "join-b")  # a new join: batches sent for the old one are refused
    with fence.lock, pytest.raises(errors.StaleEpochError):
        fence.check(1, "join-a")
    fence.close()
    with fence.lock, pytest.raises(errors.StaleEpochError):
        fence.check(1, "join-b")


def test_fence_waits_out_a_granted_lease_unless_the_primary_is_dead() -> None:
    fence = BackupFence(lease_s=10.0)
    fence.open(1, "j")
    with fence.lock:
        fence.granted()
    assert not fence.fence_if(is_primary_dead=False), "took over inside the lease"
    assert fence.fence_if(is_primary_dead=True)
    with fence.lock, pytest.raises(errors.StaleEpochError):
        fence.check(1, "j")  # once fenced, the old primary's batches are refused


def test_fence_takes_over_after_the_lease_ran_out() -> None:
    fence = BackupFence(lease_s=0.05)
    fence.open(1, "j")
    with fence.lock:
        fence.granted()
    deadline = time.monotonic() + 5
    while not fence.fence_if(is_primary_dead=False):
        assert time.monotonic() < deadline, "lease never ran out"
        time.sleep(0.01)


def test_suspicion_after_silence_or_closed_connection() -> None:
    fence = BackupFence(lease_s=1.0)
    fence.open(1, "j")
    assert not fence.is_suspect(suspect_after_s=60)
    fence.connection_closed_at = time.monotonic() + 1
    assert fence.is_suspect(suspect_after_s=60)
    fence.connection_closed_at = 0.0
    fence.last_heard_at -= 120
    assert fence.is_suspect(suspect_after_s=60)


class _AcceptingBackup:
    """A peer that accepts every call (only replicate_batch is made here)."""

    def __getattr__(self, name: str) -> object:
        return lambda *args: None


class _RecordingBackup(_AcceptingBackup):
    """A peer that keeps the arguments of every replicate_batch it is sent."""

    def __init__(self) -> None:
        self.batches: list[tuple[object, ...]] = []

    def replicate_batch(self, *args: object) -> None:
        self.batches.append(args)


def test_exactly_once_records_travel_flat_beside_the_puts_and_only_when_there_are_any() -> None:
    backup = _RecordingBackup()
    server = RpcServer("127.0.0.1", 0, backup, 1 << 20)
    server.start()
    replicator = Replicator(
        Member("node-0000000001", f"127.0.0.1:{server.port}"), 1, "j", 1.0, 2000
    )
    try:
        replicator.replicate("k", "v", ("lane-1", 5, 5))
        replicator.replicate("k", "w")
    finally:
        replicator.close()
        server.close()
    assert backup.batches == [
        (1, ["k"], ["v"], "j", None, None, None, ["lane-1"], [5], [5]),
        (1, ["k"], ["w"], "j", None, None, None, None, None, None),
    ]


def test_a_replicator_with_a_sender_thread_sends_in_order_and_fails_waiters_when_closed() -> None:
    """With several backups each line has a sender thread: writers only wait. Batches go
    out in enqueue order; after close every waiter gets BackupFailedError, none hangs."""
    backup = _RecordingBackup()
    server = RpcServer("127.0.0.1", 0, backup, 1 << 20)
    server.start()
    replicator = Replicator(
        Member("node-0000000001", f"127.0.0.1:{server.port}"),
        1,
        "j",
        1.0,
        2000,
        has_sender=True,
    )
    try:
        tickets = [replicator.enqueue(f"k{i}", str(i)) for i in range(50)]
        for ticket in tickets:
            replicator.wait(ticket)
        sent = [key for batch in backup.batches for key in batch[1]]  # type: ignore[attr-defined]
        assert sent == [f"k{i}" for i in range(50)]
        assert replicator.has_lease
    finally:
        replicator.close()
        server.close()
    with pytest.raises(BackupFailedError):
        replicator.enqueue("late", "x")
    threads = [t for t in threading.enumerate() if t.name.startswith("replicate-")]
    for thread in threads:
        thread.join(timeout=5)
    assert not any(t.is_alive() for t in threads), "the sender thread outlived close"


def test_a_backup_that_did_not_say_it_reads_flat_records_gets_them_as_changes() -> None:
    """A backup of the previous version skips fields it does not know: without its word
    (join protocol >= 2) an exactly-once put travels as a Change, as before."""
    backup = _RecordingBackup()
    server = RpcServer("127.0.0.1", 0, backup, 1 << 20)
    server.start()
    replicator = Replicator(
        Member("node-0000000001", f"127.0.0.1:{server.port}"), 1, "j", 1.0, 2000
    )
    replicator.takes_flat_records = False
    try:
        replicator.replicate("k", "v", ("lane-1", 5, 5))
    finally:
        replicator.close()
        server.close()
    [(_, keys, values, _, changes, _, _, *records)] = backup.batches
    assert (keys, values, records) == ([], [], [None, None, None])
    assert changes == [Change("k", "v", "lane-1", 5, True, 5)]


def test_the_backup_refuses_record_lists_that_do_not_match_the_entries() -> None:
    handler = NodeHandler(cast(NodeService, _AcceptingBackup()), Limits())

    def batch(keys: list[str], *records: list[Any] | None) -> None:
        handler.replicate_batch(1, keys, ["1"] * len(keys), "j", None, None, None, *records)

    with pytest.raises(errors.BadRequestError, match="as long as keys"):
        batch(["a", "b"], ["c"], [1], [1])
    with pytest.raises(errors.BadRequestError, match="as long as keys"):
        batch(["a"], ["c"], None, [1])
    batch(["a"], ["c"], [1], [1])


def test_the_primary_keeps_an_idle_replication_line_beside_the_busy_one() -> None:
    """kill -9 closes an idle line with FIN (proof the primary left) but resets one with a
    reply unread: heartbeats open a second line while there is only one."""
    server = RpcServer("127.0.0.1", 0, _AcceptingBackup(), 1 << 20)
    server.start()
    replicator = Replicator(
        Member("node-0000000001", f"127.0.0.1:{server.port}"), 1, "j", 1.0, 2000
    )
    try:
        replicator.replicate("k", "v")  # the batches' line
        assert replicator.wants_spare_line
        replicator.heartbeat()  # opens the spare
        assert not replicator.wants_spare_line
        replicator.heartbeat()
        replicator.replicate("k", "w")
        wait_until(
            lambda: server.connection_count == 2 or None,
            5.0,
            lambda: f"{server.connection_count} connections, not 2",
        )
    finally:
        replicator.close()
        server.close()


def test_durable_ids_are_kept_renamed_and_dropped_with_their_names() -> None:
    meta = (
        ClusterMeta()
        .alone(2, "node-0000000001", "127.0.0.1:9091", "aaaa")
        .with_in_sync(
            ("node-0000000001", "node-0000000003"),
            {"node-0000000003": "127.0.0.1:9090"},
            {"node-0000000003": "bbbb"},
        )
    )
    assert ClusterMeta.from_bytes(meta.to_bytes()) == meta
    assert meta.durable_members() == {"aaaa": "node-0000000001", "bbbb": "node-0000000003"}
    renamed = meta.renamed("node-0000000003", "node-0000000007")
    assert renamed.durable_members() == {"aaaa": "node-0000000001", "bbbb": "node-0000000007"}
    assert renamed.without_in_sync("node-0000000007").durable_members() == {
        "aaaa": "node-0000000001"
    }
    # metadata written before the ids moved out of the member names
    old = ClusterMeta(3, "node-cccc-0000000004", "h:1", ("node-cccc-0000000004",))
    assert old.durable_members() == {"cccc": "node-cccc-0000000004"}


class _GatedBackup(_RecordingBackup):
    """Answers a batch once the test lets it (``permits``): until then it is not through."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.permits = threading.Semaphore(0)

    def replicate_batch(self, *args: object) -> None:
        self.entered.set()
        self.permits.acquire(timeout=10)
        super().replicate_batch(*args)


def test_a_sender_thread_signals_a_waiting_poll_before_it_lets_the_waiter_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The event front polls one lasting eventfd per sender (rpc/front.py): readable once a
    polled batch is through, signalled before the waiter is let go (whose finish clears
    it), quiet between batches, closed when the sender ends; a batch nobody polls has no
    descriptor and signals nothing."""
    backup = _GatedBackup()
    server = RpcServer("127.0.0.1", 0, backup, 1 << 20)
    server.start()
    replicator = Replicator(
        Member("node-0000000001", f"127.0.0.1:{server.port}"), 1, "j", 1.0, 2000, has_sender=True
    )
    held_at_signal: list[bool] = []
    real_write = os.eventfd_write
    tickets = []

    def recording_write(fd: int, value: int) -> None:
        held_at_signal.append(tickets[-1][0].done.locked())  # (finish still waiting?)
        real_write(fd, value)

    monkeypatch.setattr(os, "eventfd_write", recording_write)
    try:
        descriptors = set()
        for key in ("a", "b"):
            tickets.append(replicator.enqueue(key, "v"))
            delivery = replicator.send_soon(tickets[-1], is_polled=True)
            assert delivery is not None
            assert select.select([delivery], [], [], 0)[0] == []  # not through yet
            backup.permits.release()
            assert select.select([delivery], [], [], 10)[0] == [delivery]
            delivery.finish()
            assert select.select([delivery], [], [], 0)[0] == []  # quiet until the next
            descriptors.add(delivery.fileno())
        assert len(descriptors) == 1
        tickets.append(replicator.enqueue("c", "v"))
        unpolled = replicator.send_soon(tickets[-1])
        assert unpolled is not None and unpolled.fileno() == -1
        backup.permits.release()
        unpolled.finish()
    finally:
        replicator.close()
        server.close()
    assert held_at_signal == [True, True]  # (none for the batch nobody polled)
    wait_until(lambda: delivery.fileno() == -1 or None, 5, lambda: "the signal stayed open")


def test_a_polled_batch_queued_when_the_replicator_closes_is_still_signalled() -> None:
    """The front's group must not wait out its deadline: the sender fails what is queued,
    signals the polled batch, and only then closes its signal (the front polls a
    duplicate of it, which outlives the close)."""
    backup = _GatedBackup()
    server = RpcServer("127.0.0.1", 0, backup, 1 << 20)
    server.start()
    replicator = Replicator(
        Member("node-0000000001", f"127.0.0.1:{server.port}"), 1, "j", 1.0, 2000, has_sender=True
    )
    try:
        first = replicator.enqueue("a", "v")  # on the wire, held by the backup
        assert backup.entered.wait(5)
        queued = replicator.enqueue("b", "v")
        delivery = replicator.send_soon(queued, is_polled=True)
        assert delivery is not None
        watch = os.dup(delivery.fileno())
        try:
            replicator.close()
            assert select.select([watch], [], [], 5)[0] == [watch]
        finally:
            os.close(watch)
        with pytest.raises(BackupFailedError):
            delivery.finish()
        with pytest.raises(BackupFailedError):
            replicator.wait(first)
    finally:
        backup.permits.release(2)
        server.close()


def test_after_a_recovery_only_left_behind_znodes_are_queued_for_removal() -> None:
    """The old in-sync set's znodes, and those whose address a later member took (the
    same node restarted), are queued; a live node registered since is not: a queued one is
    probed every tick while its znode lasts."""
    members = [
        Member("node-0000000001", "h:1"),  # old primary (in sync)
        Member("node-0000000002", "h:2"),  # old backup (in sync)
        Member("node-0000000003", "h:3"),  # old standby, restarted as node-6
        Member("node-0000000004", "h:1"),  # restarted: the recovering node
        Member("node-0000000005", "h:2"),  # restarted
        Member("node-0000000006", "h:3"),  # restarted
        Member("node-0000000007", "h:4"),  # a new node, live
    ]
    meta = ClusterMeta(1, "node-0000000001", "h:1", ("node-0000000001", "node-0000000002"))
    left = {m.name for m in follower._left_behind(members, meta)}
    assert left == {"node-0000000001", "node-0000000002", "node-0000000003"}


def test_a_stopping_node_stays_stopped_whatever_a_control_step_under_way_sets() -> None:
    """A join or a takeover on the control loop used to overwrite the STOPPED that stop() set
    from another thread (a stopping node then said standby, backup, even primary)."""
    node = StorageNode(NodeConfig("127.0.0.1", 1, "127.0.0.1:1", "/x"))
    node.role = Role.STANDBY
    assert node.role is Role.STANDBY
    node.stop("a test")
    for role in (Role.SYNCING, Role.BACKUP, Role.PRIMARY):
        node.role = role
        assert node.role is Role.STOPPED
    with pytest.raises(errors.UnavailableError, match="is stopping"):
        node.check_primary()


class _CoordinatorNamingUsPrimary:
    """What a stopping primary's control step read in a nemesis run: metadata naming it
    primary (it had just dropped its backups), a live session."""

    is_session_lost = False

    def __init__(self, name: str) -> None:
        self.meta_now = ClusterMeta(epoch=3, primary=name, in_sync=(name,))
        self.members_now = [Member(name, "127.0.0.1:1")]

    def meta(self) -> tuple[ClusterMeta, int]:
        return self.meta_now, 7

    def members(self) -> list[Member]:
        return self.members_now


def test_a_control_step_under_way_when_the_node_stops_decides_nothing() -> None:
    """SIGTERM (stop, from the signal's thread) came while the control loop read the
    metadata: the step went on, found the role not primary, and as a standby ended in DATA
    LOST (exit 3) instead of the clean stop (found by a fault campaign)."""
    node = StorageNode(NodeConfig("127.0.0.1", 1, "127.0.0.1:1", "/x"))
    node.name = "node-0000000002"
    node._coordinator = cast(Any, _CoordinatorNamingUsPrimary(node.name))
    decided: list[str] = []
    node._follower = cast(Any, types.SimpleNamespace(
        evaluate_standby=lambda *_: decided.append("standby"),
        evaluate_backup=lambda *_: decided.append("backup"),
        is_former_name=lambda _: False,
    ))  # fmt: skip
    node.role = Role.PRIMARY
    node.stop("signal SIGTERM")
    node._evaluate()
    assert decided == [] and node.role is Role.STOPPED


def test_a_late_retry_in_a_group_fails_alone_not_the_writes_grouped_with_it() -> None:
    """A late attempt of a request its client had moved past (its TCP segment held up by a
    partition, delivered once it healed) is refused with BadRequestError: it used to be
    raised out of the whole group, and every other client's write that the event front had
    grouped with it failed with BAD_REQUEST too, unapplied (found by a fault campaign:
    8 failed writes in a run with partitions, flapping, replication factor 3)."""
    node = StorageNode(NodeConfig("127.0.0.1", 1, "127.0.0.1:1", "/x"))
    node.role = Role.PRIMARY
    assert node.write_group([Write("k", "5", ("c", 5, 5))]) == [True]
    assert node.write_group([Write("k", "6", ("c", 6, 6))]) == [True]  # moved past 5
    group = node.begin_writes(
        [
            Write("other", "v", ("d", 1, 1)),
            Write("k", "late", ("c", 5, 5)),
            Write("k2", "w", ("e", 1, 1)),
        ]
    )
    outcomes = node.end_writes(group)
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], errors.BadRequestError)
    assert "moved past it" in str(outcomes[1])
    assert (node.store.get("other"), node.store.get("k"), node.store.get("k2")) == ("v", "6", "w")


class _CoordinatorWithMeta:
    """Metadata that does not move (a DATA LOST decision reads it once more)."""

    is_session_lost = False

    def __init__(self, meta: ClusterMeta) -> None:
        self.meta_now = meta

    def sync(self) -> None:
        pass

    def meta(self) -> tuple[ClusterMeta, int]:
        return self.meta_now, 7


def test_a_listed_primary_that_resumes_between_two_probes_is_no_data_loss() -> None:
    """The only in-sync member (the primary) was paused past its ZooKeeper session: a
    restarted empty node found it silent (no live in-sync member), then probed it again
    to decide whether to wait, just as it resumed and answered as the primary of the
    epoch. That answer was taken as "gone" and the node exited with DATA LOST, telling the
    operator to reset the cluster, while the primary went on serving every key (found by a
    fault campaign: SIGSTOP of the primary for 2.95 s, session timeout 2 s)."""
    node = StorageNode(NodeConfig("127.0.0.1", 1, "127.0.0.1:1", "/x"))
    node.name = "node-0000000015"
    meta = ClusterMeta(7, "node-0000000014", "h:1", ("node-0000000014",))
    node._coordinator = cast(Any, _CoordinatorWithMeta(meta))
    statuses = iter(["silent", "copy"])  # paused at the first probe, serving at the second
    node._follower._listed_status = lambda address, epoch: next(statuses)  # type: ignore
    assert not node._follower._has_live_in_sync_member(meta, [])
    node._follower._recover_or_give_up(meta, 7, [])  # raised NodeExit (DATA LOST) before


def test_a_standby_reports_no_incarnation_after_the_cluster_was_reset() -> None:
    """A backup of incarnation X that the reset (a new incarnation Y) leaves a standby
    keeps X in memory: reported in its status, it made kv status call this live member of
    the new cluster "stale" (and any probe take it for another cluster's node)."""
    node = StorageNode(NodeConfig("127.0.0.1", 1, "127.0.0.1:1", "/x"))
    node.name = "node-0000000001"
    old = ClusterMeta(4, "node-0000000000", "h:1", (node.name, "node-0000000000"))
    old = replace(old, incarnation="X" * 16)
    node.role, node.epoch = Role.BACKUP, 4
    node._coordinator = cast(Any, _CoordinatorWithMeta(old))
    node.record_incarnation(old.incarnation)
    assert node.status().incarnation == old.incarnation  # (a backup of X says so)
    reset = ClusterMeta(incarnation="Y" * 16)
    node._coordinator = cast(Any, _CoordinatorWithMeta(reset))
    node._follower.evaluate_backup(reset, 7, [])
    assert node.role is Role.STANDBY
    status = node.status()
    assert status.incarnation is None
    assert is_member(status, node.name, reset.incarnation)


class _CoordinatorWhoseSessionExpiresOnce:
    """ZooKeeper as a node starting during a blip saw it: the session expired as it checked
    the parent (kazoo's listener set is_session_lost), a new one came, the retry worked."""

    is_session_lost = False

    def __init__(self) -> None:
        self.registered: list[str] = []
        self.checks = 0

    def require_parent(self) -> None:
        self.checks += 1
        if self.checks == 1:
            self.is_session_lost = True  # (what Coordinator._on_state does on LOST)
            failure = errors.CoordinationError("ZooKeeper sync failed: the session expired")
            failure.is_transient = True
            raise failure

    def check_parent_acl(self, *_: object) -> None:
        pass

    def register(self, address: str) -> str:
        self.registered.append(address)
        return f"node-{len(self.registered):010d}"


def test_a_start_up_retry_after_a_session_expired_does_not_restart_the_node() -> None:
    """A node started during a ZooKeeper blip whose session expired before it registered
    tried again and registered in the new session, then its first control step found the
    expired session's flag still set and restarted it, empty ("ZooKeeper session expired;
    restarting empty"), a second after "serving on" (found by a fault campaign: the node
    cut from ZooKeeper just after it connected, 2 of 2 runs)."""
    node = StorageNode(NodeConfig("127.0.0.1", 1, "127.0.0.1:1", "/x"))
    coordinator = _CoordinatorWhoseSessionExpiresOnce()
    node._coordinator = cast(Any, coordinator)
    node._join_zookeeper()
    assert coordinator.checks == 2 and node.name == "node-0000000001"
    assert not coordinator.is_session_lost  # else _evaluate raises NodeExit(EXIT_RESTART)
