"""The backup and standby roles of a storage node: a collaborator the node delegates to.

- A backup applies the primary's batches under its fence (epoch + join id) and grants
  a read lease with each; it takes over only from the in-sync set, by a CAS that bumps
  the epoch, after fencing the old primary and proving it dead or outliving the lease.
- A designated backup (one of the N - 1 lowest members after the primary, N the
  replication factor) joins: it empties its store,
  has the primary forward puts to it, copies the primary's stripes (copies never
  overwrite forwarded entries) and confirms; the primary then adds it to the in-sync set.
- With no live in-sync copy left, a node exits (DATA LOST) instead of serving.
- A node that starts a new cluster (no metadata yet, or reset) starts it empty: it discards
  what it held in memory, and refuses (exits 1) if its data directory holds keys.
- A data directory holds the data of one cluster incarnation (the id in the metadata,
  coordination.py): a standby whose directory holds keys recorded for another incarnation
  exits 1 before it joins or recovers, its files untouched (a join would replace them with
  the primary's copy: a mistaken ``--reset`` or a wrong path must not destroy a backup's
  copy unasked). Before a node first changes its files for a cluster (a join, a new
  cluster) it records that cluster's id there; a directory without an id (new, or written
  by an earlier version) or without keys adopts the cluster's.
- A join that fails (wrong cluster secret, TLS mismatch, primary not serving) is tried again
  after a pause doubling from the control tick up to JOIN_RETRY_MAX_S, during which the
  standby neither probes nor joins; a new epoch or primary ends the pause. Its reason is
  logged once, and again only when it changes or JOIN_FAILURE_RELOG_S passed.

Sessions are not data. A backup's claim to the data is its name in the in-sync set, not
its ZooKeeper session. The invariant this relies on:

    While any name this node registered under during its current join is in the in-sync
    set of its epoch, its store holds every write the primary acknowledged.

It holds because the primary acknowledges a write only after this join's fence accepted
it, or after removing *every* name of this backup from the in-sync set by CAS; and while
the fence stays open the store changes only by this join's copy and batches (it is never
cleared). Batches travel over TCP, so they keep coming while ZooKeeper is away. Hence a
backup whose session expired registers again and keeps its store and its fence; it treats
its former names as its own when it reads the in-sync set (a takeover is still a CAS on
the version it read, so a concurrent drop makes it fail), and asks the primary
(``backup_renamed``, naming the join) to put its new name in place of the old one. Once no
name of it is listed (a fresh read after ZooKeeper sync), it closes the fence and joins
anew: clearing its store is then harmless. A backup whose ``join_done`` reply was lost
may be listed, so it stays a backup of that join until a fresh read says it is not.

The follower owns what only a follower needs (the fence and the per-connection flag
that marks the primary's connections); the node's shared state it reaches through
:class:`~kvstore.server.roles.NodeCore`, never the node class.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

from kvstore import errors
from kvstore.coordination import (
    ClusterMeta,
    Coordinator,
    Member,
    createznode_command,
    designated_backups,
    is_member,
    new_incarnation,
    serves_incarnation,
)
from kvstore.rpc import Connection, probe
from kvstore.server import identity as ident
from kvstore.server import wal
from kvstore.server.replication import FLAT_RECORDS, BackupFence
from kvstore.server.roles import (
    EXIT_DATA_LOST,
    EXIT_FAILED,
    NodeCore,
    NodeExit,
    Role,
    is_dead,
)
from kvstore.server.storage import FlatRecords

log = logging.getLogger(__name__)

RENAME_RETRY_S = 0.5  # a backup asks the primary to rename it at most this often
# After a full-cluster restart, how long a node that may recover from disk lets a member
# registered before it (a lower sequence) recover first, so that the primary is the lowest
# child, where clients using the seed's rule look for it.
RECOVERY_DEFER_S = 3.0
# With several in-sync backups, how long one lets a live one registered before it take over
# first (the primary then stays the lowest child, where the seed's clients look for it).
TAKEOVER_DEFER_S = 0.5
DISK_FULL_RETRY_S = 2.0  # a join that failed for a full disk is tried again after this
# A join that keeps failing (wrong cluster secret, TLS mismatch, primary not serving) is tried
# again after a pause that doubles from the control tick up to this; a new primary (or epoch)
# ends it at once, so the join after a failover is as fast as ever.
JOIN_RETRY_MAX_S = 2.0
JOIN_FAILURE_RELOG_S = 30.0  # the same reason for failing to join is logged again this often


class Follower:
    """Backup and standby behaviour of one node."""

    def __init__(self, node: NodeCore) -> None:
        self._node = node
        self.fence = BackupFence(node.config.lease_s)
        self._local = threading.local()
        self._is_waiting_logged = False
        self._is_lease_wait_logged = False
        self._deferring_since: float | None = None
        self._takeover_deferred_since: float | None = None
        # Names this node registered under earlier in its current join (see the invariant).
        self._former_names: set[str] = set()
        self._rename_asked_at = 0.0
        self._silent_logged: set[str] = set()  # addresses of listed nodes that did not answer
        # A lease this node granted before it restarted runs out at most this long after
        # now: its lease, or a longer one an earlier run granted (kept in its data directory).
        lease_s = node.config.lease_s
        wait_s = lease_s if node.store.log is None else node.store.log.lease_to_wait_out(lease_s)
        self._leases_out_at: float | None = time.monotonic() + wait_s
        # Joins that failed in a row against one (epoch, primary), and no standby step (no
        # probes, no join) before _join_after; the last reason logged, and when.
        self._join_failures = 0
        self._join_failed_with: tuple[int, str] | None = None
        self._join_after = 0.0
        self._join_failure_logged: tuple[str, float] | None = None
        self._join_failures_unlogged = 0
        self._waiting_said: tuple[int, str, int] | None = None  # (epoch, primary, replicas)
        # The join whose batches extend a complete copy: their log positions are recorded.
        self._marking_join: str | None = None

    def apply_replicated(
        self,
        epoch: int | None,
        keys: list[str],
        values: list[str],
        join_id: str | None,
        changes: list[Any],
        log_mark: wal.Marker | None = None,
        records: FlatRecords | None = None,
    ) -> None:
        fence = self.fence
        store = self._node.store
        with fence.lock:
            if fence.identity is not None:  # TLS: only the primary we joined (identity.py)
                ident.check_primary(fence.identity)
            fence.check(epoch, join_id)
            position = store.put_many(keys, values, records)
            for change in changes:
                record = (
                    None
                    if change.client_id is None
                    else (change.client_id, change.seq, change.outcome, change.acked_below)
                )
                position = store.apply_change(change.key, change.value, record) or position
            if log_mark is not None and join_id == self._marking_join:
                position = store.log_marker(log_mark) or position  # our copy goes this far
            fence.granted()
        store.wait_durable(position)  # outside the fence lock: concurrent batches share a sync
        self._local.join_id = join_id

    def on_disconnect(self, is_orderly: bool = False) -> None:
        """A connection ended (in its own thread): if the primary replicated on it, suspect
        the primary at once; an orderly close (EOF) of the current join's line proves it left."""
        join_id = getattr(self._local, "join_id", None)
        if join_id is not None:
            self.fence.connection_closed_at = time.monotonic()
            if is_orderly:
                self.fence.closed_in_order(join_id)
            self._node.wake()

    def is_listed(self, meta: ClusterMeta) -> bool:
        """Whether the in-sync set of our epoch names this node, by any name of this join."""
        node = self._node
        return meta.epoch == node.epoch and any(
            name in meta.in_sync for name in (node.name, *self._former_names)
        )

    def is_former_name(self, name: str) -> bool:
        """Whether this node registered as ``name`` earlier in its current join."""
        return name in self._former_names

    def recover_session(self, coordinator: Coordinator) -> None:
        """A backup's ZooKeeper session expired: register again, keeping the store and the
        fence (batches kept coming over TCP); evaluate_backup then checks the listing."""
        if not coordinator.is_usable():
            raise errors.CoordinationError("no ZooKeeper session yet")  # retried next tick
        node = self._node
        old_name = node.name
        coordinator.is_session_lost = False  # before: a loss during register sets it again
        try:
            new_name = coordinator.register(node.config.address)
        except errors.CoordinationError:
            coordinator.is_session_lost = True
            raise
        self._former_names.add(old_name)
        node.name = new_name
        log.warning(
            "ZooKeeper session expired: registered again as %s (was %s), keeping %d keys",
            new_name,
            old_name,
            len(node.store),
        )

    def evaluate_backup(self, meta: ClusterMeta, version: int, members: list[Member]) -> None:
        if not self.is_listed(meta):
            coordinator = self._node.require_coordinator()
            coordinator.sync()  # the primary added us just before join_done returned
            meta, version = coordinator.meta()
        if not self.is_listed(meta):
            if meta.epoch != self._node.epoch:
                why = f"a new primary took over (epoch {meta.epoch})"
            else:  # a failed batch, or let go: more backups than the replication factor
                why = (
                    f"the primary dropped this node from its in-sync set (epoch {meta.epoch}, "
                    f"replication factor {meta.replicas})"
                )
            log.warning("no longer a backup: %s; standby, joining again when designated", why)
            self._takeover_deferred_since = None
            self.fence.close()
            self._former_names.clear()
            self._node.role = Role.STANDBY
            return
        if meta.incarnation:  # (the primary adds one to an earlier version's metadata)
            self._node.record_incarnation(meta.incarnation)
        names = {m.name for m in members}
        if meta.primary in names and not self.fence.is_suspect(self._node.config.suspect_after_s):
            self._takeover_deferred_since = None
            if self._node.name not in meta.in_sync:
                self._ask_rename(meta)
            return
        if self._defers_takeover(meta, members):
            return
        is_primary_dead = self.fence.has_primary_left or self._is_primary_dead(meta)
        if not self.fence.fence_if(is_primary_dead):
            return  # the old primary may still serve reads on its lease: wait it out
        self._take_over(
            meta, version, names, "primary is dead" if is_primary_dead else "primary lease expired"
        )

    def _defers_takeover(self, meta: ClusterMeta, members: list[Member]) -> bool:
        """Whether to let another in-sync backup registered before this node, and not proven
        dead, take over first (for at most TAKEOVER_DEFER_S): any of them may, but the lowest
        keeps the primary the lowest child. One that does not answer as a backup (killed
        with the primary, say) is not waited for."""
        now = time.monotonic()
        if (
            self._takeover_deferred_since is not None
            and now - self._takeover_deferred_since >= TAKEOVER_DEFER_S
        ):
            return False  # waited long enough: no more probes
        own = Member(self._node.name, "").sequence
        lower = [
            m
            for m in members
            if m.name in meta.in_sync
            and m.name != meta.primary
            and 0 <= m.sequence < own
            and self._answers_as(m.name, m.address, Role.BACKUP, meta.incarnation)
        ]
        if not lower:
            return False
        if self._takeover_deferred_since is None:
            self._takeover_deferred_since = now
            log.info("primary suspected: letting %s take over first", lower[0].name)
        return now - self._takeover_deferred_since < TAKEOVER_DEFER_S

    def _answers_as(self, name: str, address: str, role: Role, incarnation: str) -> bool:
        """The node ``name`` (of cluster ``incarnation``) answers at ``address``, in ``role``."""
        try:
            status = probe(address, self._node.config.probe_timeout_ms, self._node.peer_tls)
        except errors.KVError:
            return False
        return (
            status is not None
            and is_member(status, name, incarnation)
            and status.role == role.value
        )

    def _ask_rename(self, meta: ClusterMeta) -> None:
        """Ask the primary to list our current name in place of a former one (at most
        every RENAME_RETRY_S; the call is short, it runs on the control loop)."""
        accepting = self.fence.accepting
        now = time.monotonic()
        if accepting is None or now - self._rename_asked_at < RENAME_RETRY_S:
            return
        self._rename_asked_at = now
        timeout_ms = int(self._node.config.suspect_after_s * 1000)
        conn = Connection(
            meta.primary_address,
            timeout_ms=timeout_ms,
            tls=self._node.peer_tls,
            secret=self._node.peer_secret,
            expected_identity=self.fence.identity,
        )
        try:
            conn.call("backup_renamed", accepting[0], accepting[1], self._node.name)
        except errors.KVError as exc:
            log.warning("primary did not rename us to %s yet: %s", self._node.name, exc)
            return
        finally:
            conn.close()
        self._node.require_coordinator().refresh()

    def _take_over(self, meta: ClusterMeta, version: int, names: set[str], why: str) -> None:
        coordinator = self._node.require_coordinator()
        new_meta = meta.alone(
            meta.epoch + 1,
            self._node.name,
            self._node.config.address,
            self._node.node_id,
            self._node.identity,
        )
        self._takeover_deferred_since = None
        if not self._node.cas_confirmed(new_meta, version):
            log.info("takeover lost a race; re-reading the cluster state")
            return
        self._former_names.clear()
        self._node.become_primary(new_meta.epoch, f"took over: {why}")
        if meta.primary in names:
            coordinator.remove_member(meta.primary)

    # ----------------------------------------------------------------- standby role

    def evaluate_standby(self, meta: ClusterMeta, version: int, members: list[Member]) -> None:
        if self._is_join_paused(meta):
            return
        if not meta.is_initialized:
            if members and members[0].name == self._node.name:
                self._start_new_cluster(meta, version)
            return
        self._refuse_another_incarnation(meta)
        names = {m.name for m in members}
        if not self._has_live_in_sync_member(meta, members):
            self._recover_or_give_up(meta, version, members)
            return
        backups = designated_backups(members, meta.primary, meta.replicas)
        if any(backup.name == self._node.name for backup in backups):
            self._join(meta, names)
        else:
            self._say_waiting(meta)

    def _say_waiting(self, meta: ClusterMeta) -> None:
        """Say once (again for another epoch, primary or factor) why this standby does not
        join: otherwise its log ends at "serving on", which reads like a node stuck."""
        said = (meta.epoch, meta.primary, meta.replicas)
        if said != self._waiting_said:
            self._waiting_said = said
            log.info(
                "standby: the replication factor is %d and the primary's %d backup(s) "
                "registered before this node; it joins when one leaves or the factor is raised",
                meta.replicas,
                meta.replicas - 1,
            )

    def _refuse_another_incarnation(self, meta: ClusterMeta) -> None:
        """NodeExit (status 1) if this node's data directory holds keys of another cluster
        incarnation than ``meta``'s: joining would replace them, recovering would serve them
        as this cluster's. Not when either id is unknown (an earlier version's)."""
        store = self._node.store
        recorded = None if store.log is None else store.log.incarnation
        if not meta.incarnation or recorded in (None, meta.incarnation) or not len(store):
            return
        assert store.log is not None
        directory, path = store.log.directory, self._node.config.zk_path
        raise NodeExit(
            EXIT_FAILED,
            f"refusing to join: this node's data directory {directory} holds "
            f"{_count(len(store), 'key')} of cluster incarnation {recorded}, but {path} holds "
            f"incarnation {meta.incarnation} (another cluster, or this one after kv-createznode "
            f"--reset); to join it empty, move {directory} aside (its files are untouched; "
            "kv dump --data-dir exports its keys); "
            f"if {directory} belongs to another cluster, start the node with that cluster's path",
        )

    def _is_join_paused(self, meta: ClusterMeta) -> bool:
        """Whether a join failed a moment ago against this same primary: then the standby
        waits out its pause (probes included: under a TLS mismatch each one costs the primary
        a refused handshake). Another epoch or primary ends the pause."""
        if not self._join_failures:
            return False
        if (meta.epoch, meta.primary) != self._join_failed_with:
            self._join_failures, self._join_after = 0, 0.0
            return False
        return time.monotonic() < self._join_after

    def _join_failed(self, meta: ClusterMeta, why: str, pause_s: float = 0.0) -> None:
        """Pause before the next try (doubling up to JOIN_RETRY_MAX_S; at least ``pause_s``)
        and say why, once: again only if the reason changes or JOIN_FAILURE_RELOG_S passed."""
        if self._node.is_stopping:
            return  # (a join cut short by the node's own stop: nothing to say or wait for)
        now = time.monotonic()
        target = (meta.epoch, meta.primary)
        if target != self._join_failed_with:  # another primary: its reasons are news
            self._join_failures, self._join_failed_with = 0, target
            self._join_failure_logged, self._join_failures_unlogged = None, 0
        self._join_failures += 1
        doubled_s = self._node.config.control_tick_s * 2 ** min(self._join_failures - 1, 16)
        self._join_after = now + max(pause_s, min(doubled_s, JOIN_RETRY_MAX_S))
        logged = self._join_failure_logged
        if logged is not None and logged[0] == why and now - logged[1] < JOIN_FAILURE_RELOG_S:
            self._join_failures_unlogged += 1
            log.debug("joining %s failed again: %s", meta.primary_address, why)
            return
        since = (
            f"; failed {self._join_failures_unlogged} more times since it was last logged"
            if self._join_failures_unlogged
            else ""
        )
        log.warning(
            "cannot join primary %s at %s: %s (trying again after a growing pause, at most %g s%s)",
            meta.primary,
            meta.primary_address,
            why,
            max(pause_s, JOIN_RETRY_MAX_S),
            since,
        )
        self._join_failure_logged, self._join_failures_unlogged = (why, now), 0

    def _join_succeeded(self) -> None:
        if self._join_failure_logged is not None:
            log.info("joining works again (it had failed: %s)", self._join_failure_logged[0])
        self._join_failures, self._join_after = 0, 0.0
        self._join_failure_logged, self._join_failures_unlogged = None, 0

    def _has_live_in_sync_member(self, meta: ClusterMeta, members: list[Member]) -> bool:
        """Some member of the in-sync set is, or may be, alive and serving.

        One with a znode, unless something proves it dead (after a full restart on the same
        ports, the new processes answering at the old addresses prove the old ones dead
        before their sessions expire). One without (its session expired: a primary or a
        backup keeps its data and registers again under a new name) if a node holding a
        copy of this epoch answers at the address it was listed with.
        """
        addresses = {m.name: m.address for m in members}
        timeout_ms, tls = self._node.config.probe_timeout_ms, self._node.peer_tls
        for name in meta.in_sync:
            if name in addresses:
                if not is_dead(name, addresses[name], timeout_ms, tls, meta.incarnation):
                    return True
            elif self._listed_status(meta.address_of(name), meta) == "copy":
                return True
        # Metadata written before addresses were recorded: the named primary answering.
        return self._is_primary_serving(meta)

    def _listed_status(self, address: str | None, meta: ClusterMeta) -> str:
        """What answers at the address of a listed member that has no znode: "copy" (a node
        holding a copy of ``meta``'s epoch, or of a later one: our metadata is stale), "silent"
        (no answer in time: paused or cut off, not gone) or "gone" (nothing listens there, a
        node without a copy, or one serving another cluster incarnation; also when no address
        was recorded)."""
        if not address:
            return "gone"
        try:
            status = probe(address, self._node.config.probe_timeout_ms, self._node.peer_tls)
        except errors.KVError:
            return "silent"
        if status is None:
            return "gone"
        is_holder = status.role in (Role.BACKUP.value, Role.PRIMARY.value)
        is_copy = (
            is_holder
            and status.epoch >= meta.epoch
            and serves_incarnation(status, meta.incarnation)
        )
        return "copy" if is_copy else "gone"

    def _waits_for_a_listed_member(self, meta: ClusterMeta, names: set[str]) -> bool:
        """Whether to wait rather than say DATA LOST: a listed member without a znode does
        not answer (it may hold the only copy), or answers holding a copy (silent a moment
        ago, paused past its session, and resumed since: decide again on the next step)."""
        for name in meta.in_sync:
            address = meta.address_of(name)
            if name in names:
                continue
            answer = self._listed_status(address, meta)
            if answer == "copy":
                return True
            if answer != "silent":
                continue
            if address not in self._silent_logged:
                self._silent_logged.add(address or "")
                log.warning(
                    "in-sync node %s at %s does not answer: waiting for it (it may be paused "
                    "or cut off, and hold the only copy) rather than saying DATA LOST",
                    name,
                    address,
                )
            return True
        return False

    def _recover_or_give_up(self, meta: ClusterMeta, version: int, members: list[Member]) -> None:
        """No member of the in-sync set is alive. Every acknowledged write is on the disk of
        each of them that has a data directory: one of those (this node, if it is one)
        takes over with what it recovered; else wait for one; else the data is lost."""
        durable = meta.durable_members()
        names = {m.name for m in members}
        node = self._node
        store_log = node.store.log
        is_complete = store_log is not None and store_log.is_complete_copy
        listed = set(meta.in_sync)  # (dead: their znodes linger)
        others = [m for m in members if m.name not in listed]
        listed_as = next((durable[i] for i in node.node_ids if i in durable), None)
        if (
            is_complete
            and listed_as is not None
            and not self._defers_to_lower(others, durable)
            and self._has_no_lease_out()
        ):
            node.new_node_id()  # (a copy of the directory from before is not this node)
            new_meta = meta.alone(
                meta.epoch + 1, node.name, node.config.address, node.node_id, node.identity
            )
            if node.cas_confirmed(new_meta, version):
                node.become_primary(
                    new_meta.epoch,
                    f"recovered from disk as {listed_as} of the last in-sync set",
                    "recovery",
                )
                # The old processes' znodes outlive them by a session timeout, and the lowest
                # of them would be the designated backup meanwhile: the cluster would run on
                # one copy. The primary removes each once it proves it dead (this node's own
                # former name included: it answers there under its new one). Queued: the old
                # in-sync members (dead, or this node would not recover) and any member whose
                # address a later member took (a restarted node; two live ones cannot share
                # it), never a live node (each queued one is probed every tick while its
                # znode lasts). Queued first, so a failure removing the old primary's below
                # does not skip them.
                node.remove_once_dead(
                    [m for m in _left_behind(members, meta) if m.name != meta.primary]
                )
                if meta.primary in names:
                    node.require_coordinator().remove_member(meta.primary)
            return
        if durable:
            if not self._is_waiting_logged:
                self._is_waiting_logged = True
                own = set(node.node_ids)  # (its own former name, when it restarted)
                log.warning(
                    "no in-sync node is alive; waiting for one with a data directory to come "
                    "back: %s",
                    ", ".join(
                        sorted(
                            f"{name} (this node before its restart)" if i in own else name
                            for i, name in durable.items()
                        )
                    ),
                )
            return
        if self._waits_for_a_listed_member(meta, names):
            return
        coordinator = node.require_coordinator()
        coordinator.sync()
        if coordinator.meta()[1] != version:
            return  # the metadata moved on (say, a backup took over): decide again on it
        config = node.config
        # (the parent's ACL lets only the credentials reset it)
        command = createznode_command(
            config.zk_connect, config.zk_path, config.zk_auth_options, config.zk_tls, reset=True
        )
        raise NodeExit(
            EXIT_DATA_LOST,
            f"DATA LOST: no node holding a complete copy is alive and none of them kept its data "
            f"on disk (in-sync set was {', '.join(meta.in_sync)}; primary {meta.primary} at "
            f"{meta.primary_address}). Refusing to serve an incomplete store. To start over with "
            f"an EMPTY store run: {command} (a node whose data directory holds keys "
            "then refuses to start or join the new cluster until that directory is moved "
            "aside)",
        )

    def _has_no_lease_out(self) -> bool:
        """Whether any read lease this node may have granted as a backup before it restarted
        has run out: a primary cut off from ZooKeeper (so not provably dead) may still
        serve reads on it, and must not while another primary takes writes."""
        if self._leases_out_at is None:
            return True
        if time.monotonic() >= self._leases_out_at:
            self._leases_out_at = None
            if self._node.store.log is not None:
                self._node.store.log.lease_waited_out(self._node.config.lease_s)
            return True
        if not self._is_lease_wait_logged:
            self._is_lease_wait_logged = True
            log.info("waiting out the read lease this node may have granted before it restarted")
        return False

    def _defers_to_lower(self, others: list[Member], durable: dict[str, str]) -> bool:
        """Whether to let a live member registered before this node recover first (for
        RECOVERY_DEFER_S): if it holds a copy it becomes primary as the lowest child.
        ``others``: members other than the listed ones (found dead, their znodes linger);
        ``durable``: the listed members' durable ids. One that answers without such an id (a
        stale backup, a node without a data directory) cannot recover: not waited for."""
        own = Member(self._node.name, "").sequence
        if not any(0 <= m.sequence < own and self._may_recover(m, durable) for m in others):
            return False
        now = time.monotonic()
        if self._deferring_since is None:
            self._deferring_since = now
            log.info("letting a node registered before this one recover first")
        return now - self._deferring_since < RECOVERY_DEFER_S

    def _may_recover(self, member: Member, durable: dict[str, str]) -> bool:
        """Whether ``member`` may hold a listed member's data directory: it answers with one
        of ``durable``'s ids, or does not answer yet (a node still loading its store)."""
        try:
            status = probe(member.address, self._node.config.probe_timeout_ms, self._node.peer_tls)
        except errors.KVError:
            return True
        if status is None:
            return True  # (not listening yet)
        return bool(status.durable_id) and status.durable_id in durable

    def _is_primary_serving(self, meta: ClusterMeta) -> bool:
        """The node named primary answers at its address, as primary."""
        return self._why_primary_not_serving(meta) is None

    def _why_primary_not_serving(self, meta: ClusterMeta) -> str | None:
        """None if the node named primary answers at its address as primary; else why not."""
        try:
            status = probe(
                meta.primary_address, self._node.config.probe_timeout_ms, self._node.peer_tls
            )
        except errors.KVError as exc:  # a timeout, a TLS mismatch, a refused certificate...
            return f"its status call failed: {exc}"
        if status is None:
            return (
                "nothing accepts connections there (a dead node's znode lasts until its "
                "session expires), or a firewall rejects this node's"
            )
        if status.node_id != meta.primary:
            return f"another node ({status.node_id}) answers there"
        if not serves_incarnation(status, meta.incarnation):
            return f"a node of another cluster (incarnation {status.incarnation}) answers there"
        if status.role != Role.PRIMARY.value:
            return f"it is {status.role}, not primary"
        return None

    def _is_primary_dead(self, meta: ClusterMeta) -> bool:
        return is_dead(
            meta.primary,
            meta.primary_address,
            self._node.config.probe_timeout_ms,
            tls=self._node.peer_tls,
            incarnation=meta.incarnation,
        )

    def _start_new_cluster(self, meta: ClusterMeta, version: int) -> None:
        """No cluster under this path yet (a fresh one, or cleared by kv-createznode --reset)
        and this node is the lowest member: start one, empty. Emptied first, before the CAS
        that names this node primary (a CAS whose reply is lost is confirmed by the control
        loop, which must then find nothing from before)."""
        node = self._node
        coordinator = node.require_coordinator()
        coordinator.sync()  # a must-be-fresh read: what follows throws data away or exits
        if coordinator.meta()[1] != version:
            return  # the metadata moved on (another node started it, say): decide again
        discarded = self._empty_for_new_cluster()
        node.new_node_id()  # listed under a new one: a copy of the directory is not this node
        meta = meta.alone(1, node.name, node.config.address, node.node_id, node.identity)
        if not meta.incarnation:  # a parent created by an earlier version
            meta = replace(meta, incarnation=new_incarnation())
        self._node.record_incarnation(meta.incarnation)  # before: it may take writes at once
        if node.cas_confirmed(meta, version):
            node.become_primary(1, f"started a new, empty store{discarded}", "new")

    def _empty_for_new_cluster(self) -> str:
        """Empty the store for a new cluster; what was discarded, for the log line ("" if
        nothing). Keys kept in a data directory are refused instead (NodeExit, status 1):
        files on disk are never deleted unasked, and they may be the last copy of what an
        operator reset by mistake. (A node that *joins* a new cluster needs none of this:
        its join replaces its store with the primary's copy, see ``_copy``.)"""
        store = self._node.store
        keys = len(store)
        records = sum(len(sessions) for sessions in store.sessions)
        if store.log is not None:
            directory = store.log.directory
            if keys:
                raise NodeExit(
                    EXIT_FAILED,
                    f"refusing to start a new cluster: this node's data directory {directory} "
                    f"holds {_count(keys, 'key')} of an earlier cluster; a new cluster starts "
                    f"empty: move {directory} aside and start the node again (kv dump --data-dir "
                    "exports its keys, for kv load into the new cluster)",
                )
            # No key: what the files hold otherwise (exactly-once records, a catch-up point
            # into an earlier cluster's log, the mark of a join cut short) goes. The empty
            # store is then a complete copy: this node's disk can recover the new cluster.
            store.clear()
            store.forget_touched()
            store.log.mark_complete()
        elif keys or records:
            store.clear()
            store.forget_touched()
        if not keys and not records:
            return ""
        what = _count(keys, "key") + f" and {_count(records, 'exactly-once record')}"
        log.warning("discarded %s held from before: a new cluster starts empty", what)
        return f" (discarded {what} from before)"

    def _join(self, meta: ClusterMeta, names: set[str]) -> None:
        why_not = self._why_primary_not_serving(meta)
        if why_not is not None:
            # Its znode may outlive it by a session timeout. Clearing the store now would
            # throw away a copy on disk that may be the last one (see _recover_or_give_up).
            if not self._forget_dead_primary(meta, names):
                self._join_failed(meta, why_not)
            return
        node = self._node
        self._node.record_incarnation(meta.incarnation)  # (checked: see evaluate_standby)
        node.epoch = meta.epoch
        since = None if node.store.log is None else node.store.log.marker
        started = time.monotonic()
        is_copied = False
        conn = Connection(
            meta.primary_address,
            timeout_ms=node.config.join_rpc_timeout_ms,
            tls=node.peer_tls,
            secret=node.peer_secret,
            # TLS: the primary the metadata lists, if it lists its identity (identity.py)
            expected_identity=meta.identity_of(meta.primary),
        )
        try:
            conn.open()  # first: its certificate (TLS) is the primary identity the join pins
            node.role = Role.SYNCING  # (not before: a refused connection leaves it a standby)
            joined = None if since is None else self._catch_up(conn, meta, since)
            if joined is None:
                joined = self._copy(conn, meta)
            join_id, how = joined
            is_copied = True
            conn.call("join_done", meta.epoch, join_id)
        except (errors.KVError, OSError) as exc:  # OSError: our disk (say, a full one)
            if not is_copied:
                self.fence.close()
                node.role = Role.STANDBY
                is_disk_full = isinstance(exc, (errors.DiskFullError, OSError))
                pause_s = DISK_FULL_RETRY_S if is_disk_full else 0.0  # each try costs a copy
                if not self._forget_dead_primary(meta, names):
                    self._join_failed(meta, str(exc) or repr(exc), pause_s)
                return
            # The primary may have listed us and lost only its reply (and then died): a
            # listed copy must neither be wiped nor wait for a dead primary. Stay a backup
            # of this join; evaluate_backup rejoins only once a fresh read shows us unlisted.
            log.warning(
                "join_done to %s failed (%s): a backup of this join until ZooKeeper says "
                "whether the primary listed us",
                meta.primary_address,
                exc,
            )
        finally:
            conn.close()
        node.role = Role.BACKUP
        self._join_succeeded()
        node.metrics.transfer_seconds.observe(time.monotonic() - started)
        log.info(
            "in sync with primary %s: %s; %d keys in %.3f s",
            meta.primary_address,
            how,
            len(node.store),
            time.monotonic() - started,
        )

    def _open_join(self, meta: ClusterMeta, keeps_store: bool, primary: str | None = None) -> str:
        """Accept batches for a new join only (the store kept, or emptied), and only from
        the ``primary`` identity (TLS: the join connection's); returns its id."""
        self.fence.close()
        self._marking_join = None
        if keeps_store:
            self._node.store.begin_catch_up()
        else:
            self._node.store.clear()
        join_id = uuid.uuid4().hex
        self.fence.open(meta.epoch, join_id, primary)
        return join_id

    def _call_join(
        self, conn: Connection, meta: ClusterMeta, join_id: str, since: tuple[Any, ...] = ()
    ) -> None:
        """``since``: (log_epoch, log_id, log_position) of an incremental catch-up."""
        lease_ms = int(self.fence.lease_s * 1000)
        node = self._node
        # Listed under a new id: a copy of the directory is not this node. Taken only now,
        # the copy already marked incomplete: a join that fails before cannot use up the
        # ids kept (a listing under an earlier one may still count).
        node.new_node_id()
        log_fields = since or (None, None, None)
        conn.call(
            "join",
            meta.epoch,
            node.name,
            join_id,
            lease_ms,
            node.node_id,
            *log_fields,
            FLAT_RECORDS,
        )

    def _catch_up(
        self, conn: Connection, meta: ClusterMeta, since: wal.Marker
    ) -> tuple[str, str] | None:
        """Keep the store and replay the primary's log from our marker (see wal.py and
        catchup.py); None if the primary does not offer that (our copy follows another
        history, its log was trimmed, it predates catch-up) or sent a damaged record: the
        caller then copies the whole store, which redoes whatever was replayed."""
        store = self._node.store
        join_id = self._open_join(meta, keeps_store=True, primary=conn.peer_identity)
        self._call_join(conn, meta, join_id, tuple(since))
        position, records, replayed, sent_bytes = since[2], 0, 0, 0
        while position != -1:
            if self._node.is_stopping:
                raise errors.UnavailableError("stopping")
            try:
                chunk = conn.call(
                    "sync_log",
                    meta.epoch,
                    join_id,
                    position,
                    self._node.config.catch_up_chunk_bytes,
                )
            except (errors.UnavailableError, errors.ProtocolError) as exc:
                if records or position != since[2]:
                    raise
                log.info("no catch-up from %s (%s): copying its store", meta.primary_address, exc)
                return None
            try:
                count, applied, last = store.replay_untouched(
                    chunk.records or b"", f"the log of {meta.primary_address} from {position}"
                )
            except wal.CorruptLogError as exc:  # the copy replaces whatever was replayed
                log.warning(
                    "catch-up from %s failed (%s): copying its store", meta.primary_address, exc
                )
                return None
            store.wait_durable(last)
            records += count
            replayed += applied
            sent_bytes += len(chunk.records or b"")
            position = chunk.next_position
        store.forget_touched()
        assert store.log is not None
        store.log.mark_complete()
        self._marking_join = join_id
        self._node.metrics.catch_up_records.inc(records)
        return join_id, (
            f"caught up from its log from position {since[2]}: {records} records "
            f"({sent_bytes} bytes; {replayed} replayed, the others overwritten by forwarded "
            f"writes meanwhile)"
        )

    def _copy(self, conn: Connection, meta: ClusterMeta) -> tuple[str, str]:
        """Empty the store and copy the primary's, stripe by stripe."""
        store = self._node.store
        join_id = self._open_join(meta, keeps_store=False, primary=conn.peer_identity)
        self._call_join(conn, meta, join_id)
        stripe = 0
        while stripe != -1:
            if self._node.is_stopping:
                raise errors.UnavailableError("stopping")
            chunk = conn.call(
                "sync_fetch", meta.epoch, join_id, stripe, self._node.config.sync_chunk_entries
            )
            store.put_if_absent_many(chunk.keys, chunk.values)
            store.add_records(
                [
                    (r.key, r.client_id, r.seq, r.outcome, r.acked_below or 0)
                    for r in chunk.records or ()
                ]
            )
            stripe = chunk.next_stripe
        store.forget_touched()
        if store.log is not None:
            store.write_snapshot()  # durable before the primary lists us
            store.log.mark_complete()
        self._marking_join = join_id
        self._node.metrics.transfer_keys.inc(len(store))
        return join_id, f"full copy of {len(store)} keys"

    def _forget_dead_primary(self, meta: ClusterMeta, names: set[str]) -> bool:
        """Remove the primary's lingering znode if it is proven dead; whether it was."""
        if meta.primary not in names or not self._is_primary_dead(meta):
            return False
        log.warning("primary %s is dead; removing its znode", meta.primary)
        self._node.require_coordinator().remove_member(meta.primary)
        return True


def _left_behind(members: list[Member], meta: ClusterMeta) -> list[Member]:
    """The members a full restart may have left behind: the last in-sync set's, and those
    whose address a member registered later took (``members`` is lowest first)."""
    later_addresses: set[str] = set()
    left = []
    for member in reversed(members):
        if member.name in meta.in_sync or member.address in later_addresses:
            left.append(member)
        later_addresses.add(member.address)
    return left


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
