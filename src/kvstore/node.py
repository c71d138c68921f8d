"""A storage node: the Thrift handler (thin) and the node's lifecycle and role logic.

Roles: starting -> standby -> syncing -> backup -> primary, or stopped.

Invariants (see coordination.py for the ZooKeeper side):
- Only the primary answers get/put/dump; everyone else refuses with NOT_PRIMARY.
- The primary acknowledges a put only after its in-sync backup applied it, or after
  it removed that backup from the in-sync set by CAS. It applies the put locally
  only then, still under the key's stripe write lock: nobody reads a value that
  could still be lost.
- The primary answers reads only while it holds a lease from its in-sync backup.
- A backup takes over only if it is in the in-sync set, by a CAS that bumps the
  epoch, and only after it stopped accepting the old primary (fence) and either
  proved the old primary dead (connection refused, or another process answers at
  its address) or let the lease it granted run out.
- A joining backup empties its store, has the primary forward puts to it, and only
  then copies the primary's stripes; copied entries never overwrite forwarded ones.
- A node that learns it was deposed, or whose ZooKeeper session expired, stops
  serving at once and restarts empty. A node that finds no live in-sync copy of
  the data says so and exits instead of serving an incomplete store.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from kvstore import errors
from kvstore.config import NodeConfig
from kvstore.coordination import ClusterMeta, Coordinator, Member, connect
from kvstore.idl import NodeStatus, SyncChunk
from kvstore.replication import BackupFailedError, BackupFence, Replicator
from kvstore.rpc import Connection, RpcServer, probe
from kvstore.storage import StripedStore

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DATA_LOST = 2
EXIT_RESTART = 75  # the CLI re-executes the node with the same arguments
TICK_S = 0.05
CAS_ATTEMPTS = 20


class Role(enum.StrEnum):
    STARTING = "starting"
    STANDBY = "standby"
    SYNCING = "syncing"
    BACKUP = "backup"
    PRIMARY = "primary"
    STOPPED = "stopped"


class NodeExit(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class StorageNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = StripedStore(config.stripe_count)
        self.role = Role.STARTING
        self.epoch = 0
        self.name = ""
        self.primary_address = ""
        self._fence = BackupFence(config.lease_s)
        self._replicator: Replicator | None = None
        self._backup_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop_reason: NodeExit | None = None
        self._dead_backups: list[Member] = []
        self._local = threading.local()
        self._coordinator: Coordinator | None = None
        self.server = RpcServer(
            config.host,
            config.port,
            NodeHandler(self),
            config.limits.max_frame_bytes,
            on_disconnect=self._on_disconnect,
        )

    # ----------------------------------------------------------------- lifecycle

    def run(self) -> int:
        """Serve until stopped; returns an exit code (EXIT_RESTART: start again, empty)."""
        self.server.bind()
        self.server.start()
        config = self.config
        zk = connect(config.zk_connect, config.zk_session_timeout_s, config.zk_connect_timeout_s)
        self._coordinator = Coordinator(zk, config.zk_path, self._wakeup.set)
        self.name = self._coordinator.register(config.address)
        self.role = Role.STANDBY
        log.info("node %s serving on %s under %s", self.name, config.address, config.zk_path)
        try:
            self._control_loop()
        except NodeExit as exc:
            self._stop_reason = exc
        finally:
            self._shutdown()
        assert self._stop_reason is not None
        return self._stop_reason.code

    def stop(self, reason: str = "asked to stop", code: int = EXIT_OK) -> None:
        """Stop serving at once; the control loop winds the node down. Safe from any thread."""
        self.role = Role.STOPPED
        if self._stop_reason is None:
            self._stop_reason = NodeExit(code, reason)
        self._wakeup.set()

    def _shutdown(self) -> None:
        self.role = Role.STOPPED
        reason = self._stop_reason
        log.log(
            logging.INFO if reason is None or reason.code == EXIT_OK else logging.WARNING,
            "node %s stopping: %s",
            self.name,
            reason,
        )
        self.server.close()
        with self._backup_lock:
            if self._replicator is not None:
                self._replicator.close()
                self._replicator = None
        if self._coordinator is not None:
            self._coordinator.close()

    def _control_loop(self) -> None:
        while True:
            self._wakeup.wait(TICK_S)
            self._wakeup.clear()
            if self._stop_reason is not None:
                raise self._stop_reason
            try:
                self._evaluate()
            except NodeExit:
                raise
            except Exception as exc:  # ZooKeeper hiccup, peer down: try again next tick
                log.warning("control step failed: %r", exc)
                log.debug("control step failure", exc_info=True)
                time.sleep(TICK_S)

    def _evaluate(self) -> None:
        coordinator = self._require_coordinator()
        if coordinator.is_session_lost:
            raise NodeExit(EXIT_RESTART, "ZooKeeper session expired; restarting empty")
        meta, version = coordinator.meta()
        members = coordinator.members()
        self.primary_address = meta.primary_address
        if self.role == Role.PRIMARY:
            self._evaluate_primary(meta)
        elif self.role == Role.BACKUP:
            self._evaluate_backup(meta, version, members)
        else:
            self._evaluate_standby(meta, version, members)

    def _require_coordinator(self) -> Coordinator:
        if self._coordinator is None:
            raise errors.UnavailableError("node is starting")
        return self._coordinator

    # ----------------------------------------------------------------- primary role

    def _evaluate_primary(self, meta: ClusterMeta) -> None:
        if meta.epoch != self.epoch or meta.primary != self.name:
            raise NodeExit(EXIT_RESTART, f"deposed: epoch {meta.epoch} primary is {meta.primary}")
        replicator = self._replicator
        if replicator is not None and (
            time.monotonic() - replicator.last_send_at >= self.config.heartbeat_interval_s
        ):
            try:
                replicator.heartbeat()
            except BackupFailedError as exc:
                self._drop_backup(replicator, f"heartbeat failed: {exc}")
        self._remove_dead_backups()

    def _remove_dead_backups(self) -> None:
        while self._dead_backups:
            member = self._dead_backups.pop()
            if _is_dead(member.name, member.address, self.config.probe_timeout_ms):
                log.info("backup %s (%s) is dead; removing its znode", member.name, member.address)
                self._require_coordinator().remove_member(member.name)

    def replicate_put(self, key: str, value: str) -> None:
        """The primary's put: replicate, then apply, under the key's stripe write lock."""
        lock, shard = self.store.stripe_for_write(key)
        with lock:
            replicator = self._replicator
            if replicator is not None:
                try:
                    replicator.replicate(key, value)
                except BackupFailedError as exc:
                    self._drop_backup(replicator, str(exc))
            self.check_primary()
            shard[key] = value

    def read(self, key: str) -> str:
        value = self.store.get(key)
        self.confirm_read()
        return "" if value is None else value

    def confirm_read(self) -> None:
        """Vouch for what this node read a moment ago, or raise.

        Checked *after* reading: the read may have waited on a stripe lock past the end
        of the lease. A lease still valid now was valid then; otherwise a heartbeat the
        backup accepts now proves it had not taken over (and accepted writes) by then.
        """
        replicator = self._replicator
        if replicator is not None and replicator.is_in_sync and not replicator.has_lease:
            try:
                replicator.heartbeat()
            except BackupFailedError as exc:
                self._drop_backup(replicator, f"lease renewal failed: {exc}")
        self.check_primary()

    def _drop_backup(self, replicator: Replicator, reason: str) -> None:
        """Stop replicating to a failed backup; first remove it from the in-sync set."""
        with self._backup_lock:
            if replicator is not self._replicator:
                return  # already dropped (or replaced) by another thread
            if replicator.is_in_sync:
                name = replicator.backup.name
                self._update_meta(
                    lambda m: m.with_in_sync(tuple(n for n in m.in_sync if n != name))
                )
            self._replicator = None
        replicator.close()
        log.warning(
            "dropped backup %s (%s): %s", replicator.backup.name, replicator.backup.address, reason
        )
        self._dead_backups.append(replicator.backup)
        self._wakeup.set()

    def _update_meta(self, change: Callable[[ClusterMeta], ClusterMeta]) -> None:
        """CAS a change into the metadata, as primary of this epoch (else: deposed)."""
        coordinator = self._require_coordinator()
        for _ in range(CAS_ATTEMPTS):
            coordinator.refresh()
            meta, version = coordinator.meta()
            if meta.epoch != self.epoch or meta.primary != self.name:
                self.stop(f"deposed: epoch {meta.epoch} primary is {meta.primary}", EXIT_RESTART)
                raise errors.DeposedError("this node is no longer the primary")
            wanted = change(meta)
            if wanted == meta or coordinator.compare_and_set(wanted, version):
                return
        raise errors.CoordinationError("metadata kept changing; giving up this update")

    def accept_join(self, epoch: int, backup_name: str) -> int:
        self.check_primary(epoch)
        coordinator = self._require_coordinator()
        coordinator.refresh()
        candidates = [m for m in coordinator.members() if m.name != self.name]
        if not candidates or candidates[0].name != backup_name:
            raise errors.UnavailableError(f"{backup_name} is not the designated backup")
        with self._backup_lock:
            old = self._replicator
            if old is not None and old.is_in_sync:
                name = old.backup.name
                self._update_meta(
                    lambda m: m.with_in_sync(tuple(n for n in m.in_sync if n != name))
                )
            if old is not None:
                old.close()
            config = self.config
            self._replicator = Replicator(
                candidates[0], epoch, config.lease_s, config.rpc_timeout_ms
            )
        log.info("backup %s (%s) joining", backup_name, candidates[0].address)
        return self.store.stripe_count

    def sync_chunk(
        self, epoch: int, backup_name: str, first_stripe: int, max_entries: int
    ) -> object:
        self.check_primary(epoch)
        self._require_joining(backup_name)
        if not 0 <= first_stripe < self.store.stripe_count:
            raise errors.BadRequestError(f"no stripe {first_stripe}")
        keys, values, next_stripe = self.store.snapshot_stripes(first_stripe, max(1, max_entries))
        return SyncChunk(keys=keys, values=values, next_stripe=next_stripe)

    def finish_join(self, epoch: int, backup_name: str) -> None:
        self.check_primary(epoch)
        with self._backup_lock:
            replicator = self._require_joining(backup_name)
            # From here on reads need the new backup's lease: it may take over once in sync.
            replicator.is_in_sync = True
            try:
                self._update_meta(lambda m: m.with_in_sync((self.name, backup_name)))
            except Exception:
                replicator.is_in_sync = False
                raise
        log.info("backup %s is in sync (%d keys)", backup_name, len(self.store))

    def _require_joining(self, backup_name: str) -> Replicator:
        replicator = self._replicator
        if replicator is None or replicator.backup.name != backup_name or replicator.is_broken:
            raise errors.UnavailableError(f"{backup_name} is not joining (replication was reset)")
        return replicator

    def check_primary(self, epoch: int | None = None) -> None:
        if self.role != Role.PRIMARY:
            if self.role == Role.STOPPED:
                raise errors.UnavailableError(f"node {self.name} is stopping")
            hint = (
                f" {errors.NOT_PRIMARY_HINT}{self.primary_address}" if self.primary_address else ""
            )
            raise errors.NotPrimaryError(
                f"node {self.name} is {self.role.value}, not the primary.{hint}"
            )
        if epoch is not None and epoch != self.epoch:
            raise errors.StaleEpochError(f"epoch {epoch} is not the current epoch {self.epoch}")

    # ----------------------------------------------------------------- backup role

    def apply_replicated(self, epoch: int | None, keys: list[str], values: list[str]) -> None:
        fence = self._fence
        with fence.lock:
            fence.check(epoch)
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
            self.role = Role.STANDBY
            return
        names = {m.name for m in members}
        if meta.primary in names and not self._fence.is_suspect(self.config.suspect_after_s):
            return
        is_dead = _is_dead(meta.primary, meta.primary_address, self.config.probe_timeout_ms)
        if not self._fence.fence_if(is_dead):
            return  # the old primary may still serve reads on its lease: wait it out
        self._take_over(
            meta, version, names, "primary is dead" if is_dead else "primary lease expired"
        )

    def _take_over(self, meta: ClusterMeta, version: int, names: set[str], why: str) -> None:
        coordinator = self._require_coordinator()
        new_meta = ClusterMeta(
            epoch=meta.epoch + 1,
            primary=self.name,
            primary_address=self.config.address,
            in_sync=(self.name,),
        )
        if not coordinator.compare_and_set(new_meta, version):
            log.info("takeover lost a race; re-reading the cluster state")
            return
        self.epoch = new_meta.epoch
        self.primary_address = self.config.address
        self.role = Role.PRIMARY
        log.warning(
            "took over as primary (epoch %d, %d keys): %s", self.epoch, len(self.store), why
        )
        if meta.primary in names:
            coordinator.remove_member(meta.primary)

    # ----------------------------------------------------------------- standby role

    def _evaluate_standby(self, meta: ClusterMeta, version: int, members: list[Member]) -> None:
        coordinator = self._require_coordinator()
        if not meta.is_initialized:
            if members and members[0].name == self.name:
                self._start_new_cluster(coordinator, version)
            return
        names = {m.name for m in members}
        if not any(name in names for name in meta.in_sync):
            raise NodeExit(
                EXIT_DATA_LOST,
                f"DATA LOST: no node holding a complete copy is alive (in-sync set was "
                f"{', '.join(meta.in_sync)}; primary {meta.primary} at {meta.primary_address}). "
                f"Refusing to serve an incomplete store. To start over with an EMPTY store run: "
                f"kv-createznode --reset {self.config.zk_connect} {self.config.zk_path}",
            )
        candidates = [m for m in members if m.name != meta.primary]
        if candidates and candidates[0].name == self.name:
            self._join(meta, names)

    def _start_new_cluster(self, coordinator: Coordinator, version: int) -> None:
        meta = ClusterMeta(1, self.name, self.config.address, (self.name,))
        if coordinator.compare_and_set(meta, version):
            self.epoch, self.role, self.primary_address = 1, Role.PRIMARY, self.config.address
            log.info("started a new, empty store as primary (epoch 1)")

    def _join(self, meta: ClusterMeta, names: set[str]) -> None:
        self.role = Role.SYNCING
        self.epoch = meta.epoch
        self.store.clear()
        self._fence.open(meta.epoch)
        conn = Connection(meta.primary_address, timeout_ms=max(self.config.rpc_timeout_ms, 10_000))
        started = time.monotonic()
        try:
            conn.call("join", meta.epoch, self.name)
            stripe = 0
            while stripe != -1:
                if self._stop_reason is not None:
                    return
                chunk = conn.call(
                    "sync_fetch", meta.epoch, self.name, stripe, self.config.sync_chunk_entries
                )
                self.store.put_if_absent_many(chunk.keys, chunk.values)
                stripe = chunk.next_stripe
            conn.call("join_done", meta.epoch, self.name)
        except errors.KVError as exc:
            self.role = Role.STANDBY
            self._fence.fence_if(True)
            log.warning("joining %s failed: %s", meta.primary_address, exc)
            self._forget_dead_primary(meta, names, exc)
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

    def _forget_dead_primary(self, meta: ClusterMeta, names: set[str], exc: errors.KVError) -> None:
        if not isinstance(exc, errors.ConnectError) or meta.primary not in names:
            return
        if _is_dead(meta.primary, meta.primary_address, self.config.probe_timeout_ms):
            log.warning("primary %s is dead; removing its znode", meta.primary)
            self._require_coordinator().remove_member(meta.primary)

    # ----------------------------------------------------------------- introspection

    def status(self) -> object:
        return NodeStatus(
            node_id=self.name,
            role=self.role.value,
            epoch=self.epoch,
            key_count=len(self.store),
            primary_address=self.primary_address,
        )


def _is_dead(name: str, address: str, timeout_ms: int) -> bool:
    """True only if no process serves ``name`` at ``address`` any more.

    Connection refused means no listener; another node id answering means another
    process owns the port (nodes never share a port: no SO_REUSEPORT). A timeout
    proves nothing: the node may be paused.
    """
    if not address:
        return False
    try:
        status = probe(address, timeout_ms)
    except errors.KVError:
        return False
    return status is None or status.node_id != name or status.role == Role.STOPPED.value


class NodeHandler:
    """The Thrift service: validates arguments and delegates to the node."""

    def __init__(self, node: StorageNode) -> None:
        self._node = node
        limits = node.config.limits
        self._max_key_bytes = limits.max_key_bytes
        self._max_value_bytes = limits.max_value_bytes

    def get(self, key: object) -> str:
        self._node.check_primary()
        try:
            return self._node.read(self._text(key, "key", self._max_key_bytes))
        except (errors.DeposedError, errors.CoordinationError) as exc:
            raise errors.UnavailableError(f"cannot serve the read: {exc}") from None

    def put(self, key: object, value: object) -> None:
        self._node.check_primary()
        checked_key = self._text(key, "key", self._max_key_bytes)
        checked_value = self._text(value, "value", self._max_value_bytes)
        try:
            self._node.replicate_put(checked_key, checked_value)
        except (errors.DeposedError, errors.CoordinationError) as exc:
            raise errors.ReplicationFailedError(
                f"put not confirmed, outcome unknown: {exc}"
            ) from None

    def replicate(self, key: object, value: object, epoch: int | None) -> None:
        keys = [self._text(key, "key", self._max_key_bytes)]
        values = [self._text(value, "value", self._max_value_bytes)]
        self._node.apply_replicated(epoch, keys, values)

    def replicate_batch(
        self, epoch: int | None, keys: list[str] | None, values: list[str] | None
    ) -> None:
        keys, values = keys or [], values or []
        if len(keys) != len(values):
            raise errors.BadRequestError("replicate_batch: keys and values differ in length")
        self._node.apply_replicated(epoch, keys, values)

    def dump(self) -> dict[str, str]:
        node = self._node
        node.check_primary()
        snapshot = node.store.snapshot()
        try:
            node.confirm_read()
        except (errors.DeposedError, errors.CoordinationError) as exc:
            raise errors.UnavailableError(f"cannot serve the dump: {exc}") from None
        return snapshot

    def status(self) -> object:
        return self._node.status()

    def join(self, epoch: int | None, backup_id: object) -> int:
        return self._node.accept_join(_required_int(epoch), self._text(backup_id, "backup_id", 256))

    def sync_fetch(
        self, epoch: int | None, backup_id: object, first: int | None, most: int | None
    ) -> object:
        name = self._text(backup_id, "backup_id", 256)
        return self._node.sync_chunk(
            _required_int(epoch), name, _required_int(first), _required_int(most)
        )

    def join_done(self, epoch: int | None, backup_id: object) -> None:
        self._node.finish_join(_required_int(epoch), self._text(backup_id, "backup_id", 256))

    @staticmethod
    def _text(value: object, what: str, max_bytes: int) -> str:
        if not isinstance(value, str):
            raise errors.BadRequestError(f"{what} is required and must be a UTF-8 string")
        if len(value) * 4 > max_bytes and len(value.encode()) > max_bytes:
            raise errors.TooLargeError(f"{what} is larger than {max_bytes} bytes")
        return value


def _required_int(value: int | None) -> int:
    if not isinstance(value, int):
        raise errors.BadRequestError("a required integer argument is missing")
    return value
