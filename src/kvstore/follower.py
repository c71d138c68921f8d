"""The backup and standby roles of a storage node (a mixin of StorageNode).

- A backup applies the primary's batches under its fence (epoch + join id) and grants
  a read lease with each; it takes over only from the in-sync set, by a CAS that bumps
  the epoch, after fencing the old primary and proving it dead or outliving the lease.
- The designated backup (lowest member after the primary) joins: it empties its store,
  has the primary forward puts to it, copies the primary's stripes (copies never
  overwrite forwarded entries) and confirms; the primary then adds it to the in-sync set.
- With no live in-sync copy left, a node exits (DATA LOST) instead of serving.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.coordination import ClusterMeta, Coordinator, Member, designated_backup
from kvstore.roles import EXIT_DATA_LOST, NodeExit, Role, is_dead
from kvstore.rpc import Connection

if TYPE_CHECKING:
    from kvstore.config import NodeConfig
    from kvstore.replication import BackupFence
    from kvstore.storage import StripedStore

log = logging.getLogger(__name__)


class FollowerRole:
    """Backup and standby behaviour; StorageNode provides the state and helpers declared here."""

    config: NodeConfig
    store: StripedStore
    role: Role
    epoch: int
    name: str
    _fence: BackupFence
    _local: threading.local
    _wakeup: threading.Event
    _stop_reason: NodeExit | None

    def _require_coordinator(self) -> Coordinator:
        raise NotImplementedError

    def _cas_confirmed(self, wanted: ClusterMeta, version: int) -> bool:
        raise NotImplementedError

    def _become_primary(self, epoch: int, why: str) -> None:
        raise NotImplementedError

    def apply_replicated(
        self, epoch: int | None, keys: list[str], values: list[str], join_id: str | None
    ) -> None:
        fence = self._fence
        with fence.lock:
            fence.check(epoch, join_id)
            self.store.put_many(keys, values)
            fence.granted()
        self._local.is_from_primary = True

    def _on_disconnect(self) -> None:
        if getattr(self._local, "is_from_primary", False):
            self._fence.connection_closed_at = time.monotonic()
            self._wakeup.set()

    def _evaluate_backup(self, meta: ClusterMeta, version: int, members: list[Member]) -> None:
        if meta.epoch != self.epoch or self.name not in meta.in_sync:
            coordinator = self._require_coordinator()
            coordinator.sync()  # the primary added us just before join_done returned
            meta, version = coordinator.meta()
        if meta.epoch != self.epoch or self.name not in meta.in_sync:
            log.warning("no longer in sync with the primary (epoch %d); rejoining", meta.epoch)
            self._fence.close()
            self.role = Role.STANDBY
            return
        names = {m.name for m in members}
        if meta.primary in names and not self._fence.is_suspect(self.config.suspect_after_s):
            return
        is_primary_dead = self._is_primary_dead(meta)
        if not self._fence.fence_if(is_primary_dead):
            return  # the old primary may still serve reads on its lease: wait it out
        self._take_over(
            meta, version, names, "primary is dead" if is_primary_dead else "primary lease expired"
        )

    def _take_over(self, meta: ClusterMeta, version: int, names: set[str], why: str) -> None:
        coordinator = self._require_coordinator()
        new_meta = ClusterMeta(
            epoch=meta.epoch + 1,
            primary=self.name,
            primary_address=self.config.address,
            in_sync=(self.name,),
        )
        if not self._cas_confirmed(new_meta, version):
            log.info("takeover lost a race; re-reading the cluster state")
            return
        self._become_primary(new_meta.epoch, f"took over: {why}")
        if meta.primary in names:
            coordinator.remove_member(meta.primary)

    # ----------------------------------------------------------------- standby role

    def _evaluate_standby(self, meta: ClusterMeta, version: int, members: list[Member]) -> None:
        if not meta.is_initialized:
            if members and members[0].name == self.name:
                self._start_new_cluster(version)
            return
        names = {m.name for m in members}
        if not any(name in names for name in meta.in_sync) and self._is_primary_dead(meta):
            raise NodeExit(
                EXIT_DATA_LOST,
                f"DATA LOST: no node holding a complete copy is alive (in-sync set was "
                f"{', '.join(meta.in_sync)}; primary {meta.primary} at {meta.primary_address}). "
                f"Refusing to serve an incomplete store. To start over with an EMPTY store run: "
                f"kv-createznode --reset {self.config.zk_connect} {self.config.zk_path}",
            )
        backup = designated_backup(members, meta.primary)
        if backup is not None and backup.name == self.name:
            self._join(meta, names)

    def _is_primary_dead(self, meta: ClusterMeta) -> bool:
        return is_dead(meta.primary, meta.primary_address, self.config.probe_timeout_ms)

    def _start_new_cluster(self, version: int) -> None:
        meta = ClusterMeta(1, self.name, self.config.address, (self.name,))
        if self._cas_confirmed(meta, version):
            self._become_primary(1, "started a new, empty store")

    def _join(self, meta: ClusterMeta, names: set[str]) -> None:
        self.role = Role.SYNCING
        self.epoch = meta.epoch
        self._fence.close()
        self.store.clear()
        join_id = uuid.uuid4().hex
        self._fence.open(meta.epoch, join_id)
        started = time.monotonic()
        is_copied = False
        conn = Connection(meta.primary_address, timeout_ms=max(self.config.rpc_timeout_ms, 10_000))
        try:
            conn.call("join", meta.epoch, self.name, join_id, int(self._fence.lease_s * 1000))
            stripe = 0
            while stripe != -1:
                if self._stop_reason is not None:
                    return
                chunk = conn.call(
                    "sync_fetch", meta.epoch, join_id, stripe, self.config.sync_chunk_entries
                )
                self.store.put_if_absent_many(chunk.keys, chunk.values)
                stripe = chunk.next_stripe
            is_copied = True
            conn.call("join_done", meta.epoch, join_id)
        except errors.KVError as exc:
            if not (is_copied and self._is_listed_in_sync(meta.epoch)):
                self._fence.close()
                self.role = Role.STANDBY
                log.warning("joining %s failed: %s", meta.primary_address, exc)
                self._forget_dead_primary(meta, names)
                return
        finally:
            conn.close()
        self.role = Role.BACKUP
        log.info(
            "in sync with primary %s: %d keys in %.3f s",
            meta.primary_address,
            len(self.store),
            time.monotonic() - started,
        )

    def _is_listed_in_sync(self, epoch: int) -> bool:
        """After join_done failed: did the primary add us anyway (and only its reply got lost)?"""
        coordinator = self._require_coordinator()
        try:
            coordinator.sync()
            meta, _ = coordinator.meta()
        except errors.CoordinationError:
            return False
        return meta.epoch == epoch and self.name in meta.in_sync

    def _forget_dead_primary(self, meta: ClusterMeta, names: set[str]) -> None:
        if meta.primary not in names:
            return
        if self._is_primary_dead(meta):
            log.warning("primary %s is dead; removing its znode", meta.primary)
            self._require_coordinator().remove_member(meta.primary)
