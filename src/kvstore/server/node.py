"""A storage node: its lifecycle, its control loop and the primary role.

The backup and standby roles live in follower.py, the Thrift handler in handler.py.

Roles: starting -> standby -> syncing -> backup -> primary, or stopped.

Invariants (see coordination.py for the ZooKeeper side):
- Only the primary answers get/put/dump; everyone else refuses with NOT_PRIMARY.
- The primary acknowledges a put only after each of its in-sync backups (up to the
  replication factor N minus one) applied it, or after it removed that backup from the
  in-sync set by CAS. It applies the put locally
  only then, still under the key's stripe write lock: nobody reads a value that
  could still be lost. With a data directory it logs the put *before* forwarding it,
  and logs and forwards in one order (see _log_and_forward, catchup.py).
- The primary answers reads only while it holds a lease from every in-sync backup.
- A backup takes over only if it is in the in-sync set (any of them may: the CAS picks
  one, the others rejoin the new primary), by a CAS that bumps the
  epoch, and only after it stopped accepting the old primary (fence) and either
  proved the old primary dead (connection refused, or another process answers at
  its address) or let the lease it granted run out.
- A joining backup empties its store, has the primary forward puts to it, and only
  then copies the primary's stripes; copied entries never overwrite forwarded ones.
- A node that learns it was deposed stops serving at once and restarts empty. Sessions
  are not data: a primary or a backup whose ZooKeeper session expired registers again and
  keeps its store (the primary renames itself in the metadata; the backup asks the
  primary to rename it, see follower.py for the invariant); only a node holding no
  listed copy (standby, syncing) restarts. A node that finds no live in-sync copy of
  the data says so and exits instead of serving an incomplete store.
- A node with a data directory runs under its directory's node id only if no live member
  answers with that id (a copied directory, ``_refuse_a_twin``): one id, one copy.
- A node never creates the cluster's parent znode on its own (only --create-parent, at
  start): it refuses to start without one, and stops (EXIT_FAILED) when it finds it gone,
  whatever its role, rather than bring the cluster back new and empty.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvstore import errors
from kvstore.config import NodeConfig, TlsConfig
from kvstore.coordination import (
    ClusterMeta,
    Coordinator,
    Member,
    connect,
    designated_backups,
    is_member,
    new_incarnation,
)
from kvstore.idl import Change, KeyValueService, NodeStatus, ScanChunk, SyncChunk
from kvstore.rpc import (
    CONNECTION_METHODS,
    RpcServer,
    client_tls_context,
    probe,
    server_tls_context,
)
from kvstore.server import catchup
from kvstore.server import identity as ident
from kvstore.server.failurelog import FailureLog
from kvstore.server.follower import Follower
from kvstore.server.handler import NODE_ONLY_METHODS, NodeHandler, Write
from kvstore.server.metrics import MetricsServer, NodeMetrics, NodeState, instrument
from kvstore.server.replication import (
    FLAT_RECORDS,
    BackupFailedError,
    Delivery,
    Replicator,
    SenderDelivery,
)
from kvstore.server.roles import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RESTART,
    NodeExit,
    Role,
    why_gone,
)
from kvstore.server.sessions import RequestRecord
from kvstore.server.storage import FlatRecords, StripedStore
from kvstore.server.wal import Marker, SyncDelivery, WriteAheadLog

log = logging.getLogger(__name__)

DISK_WARNING_EVERY_S = 60.0  # a snapshot skipped for lack of space is logged this often
ZK_RETRY_PAUSE_S = 0.5  # between attempts to check the parent and register, ZooKeeper away
PARENT_GONE = (
    "it was deleted while this node ran; stopping rather than re-create it (a new parent "
    "holds a new, empty cluster). kv-createznode creates one, if that is what you want"
)


class WriteGroup:
    """Writes between ``begin_writes`` and ``end_writes`` (see ``StorageNode.write_group``)."""

    __slots__ = (
        "changing",
        "deliveries",
        "durable",
        "failed",
        "failure",
        "locks",
        "logged",
        "outcomes",
        "position",
        "writes",
    )

    def __init__(self, writes: Sequence[Write], locks: list[Any]) -> None:
        self.writes = writes
        self.locks = locks  # the stripe locks it holds
        self.outcomes: list[bool | Exception] = [False] * len(writes)
        self.changing: list[int] = []  # the writes that change the store, in order
        self.logged = 0  # how many of them were logged and forwarded
        self.failure: Exception | None = None  # what stopped the others
        self.position = 0  # the log's end after them
        # Batches sent without waiting for the reply, and backups that failed (why).
        self.deliveries: list[tuple[Replicator, Delivery | SenderDelivery]] = []
        self.failed: dict[Replicator, str] = {}
        self.durable: SyncDelivery | None = None  # the log's fsync, run by its syncer


class StorageNode:
    """One storage node; implements NodeCore for its follower and NodeService for its handler."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = StripedStore(config.stripe_count)
        self._stopping = threading.Event()  # set once, when the node starts to stop
        self._role = Role.STARTING
        self.epoch = 0
        self.name = ""
        self.primary_address = ""
        # One per backup (joining or in sync); replaced whole, under _backup_lock (and under
        # _sequence_lock when one is added), so the write path reads it without a lock.
        self._replicators: tuple[Replicator, ...] = ()
        self._backup_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop_reason: NodeExit | None = None
        self._dead_backups: list[Member] = []
        self._dead_backups_lock = threading.Lock()  # drops append from several threads
        self._coordinator: Coordinator | None = None
        self._session_lost_at: float | None = None
        # With a data directory: kept across restarts, new for each listing (wal.new_node_id)
        self.node_id: str | None = None
        # The cluster incarnation it last served or joined ("": none yet), in its status: a
        # node of another cluster at a listed member's address is no copy of this one's data.
        self.incarnation = ""
        self.metrics = NodeMetrics(self._metrics_state)
        # Per-request and per-batch observations cost a few µs each: only when scraped.
        self._is_metered = config.metrics_port is not None
        self._metrics_server: MetricsServer | None = None
        self._in_sync_size = 0
        tls = config.tls
        # Its own calls to other nodes (replication, join, probes) present the node certificate.
        self.peer_tls = None if tls is None else client_tls_context(*_tls_files(tls))
        self.peer_secret = config.cluster_secret  # ... and prove the cluster secret
        # Its certificate's identity, which the metadata lists it with (None: no TLS).
        self.identity = None if tls is None else ident.own_identity(tls.cert_path)
        if config.data_dir is not None:
            self._open_data_dir(Path(config.data_dir))
        # Orders log appends and enqueues to the replicator (taken after a stripe lock and
        # after _backup_lock, never before them), so that a batch is a range of the log (for
        # a backup's catch-up). Without a log there is nothing to order: no lock.
        self._sequence_lock: AbstractContextManager[Any] = (
            threading.Lock() if self.store.log is not None else contextlib.nullcontext()
        )
        self._follower = Follower(self)
        handler = NodeHandler(self, config.limits)
        if self._is_metered:
            methods = [m for m in KeyValueService.thrift_services if m not in CONNECTION_METHODS]
            instrument(handler, methods, self.metrics)
        self.server = RpcServer(
            config.host,
            config.port,
            handler,
            config.limits.max_frame_bytes,
            on_disconnect=self._follower.on_disconnect,
            tls=None if tls is None else server_tls_context(*_tls_files(tls)),
            node_only_methods=NODE_ONLY_METHODS,
            cluster_secret=config.cluster_secret,
            advertised_address=config.address,
            event_front=config.event_front,
            reply_budget_bytes=config.limits.reply_budget_bytes,
        )

    # ----------------------------------------------------------------- lifecycle

    def _open_data_dir(self, directory: Path) -> None:
        """Load the store from its snapshot and log; from here on every mutation is logged."""
        observe_fsync = self.metrics.fsync_seconds.observe if self._is_metered else None
        log_ = WriteAheadLog(directory, self.config.fsync, observe_fsync)
        self.store.log = log_
        started = time.monotonic()
        records = self.store.recover()
        self.node_id = log_.node_id
        log.info(
            "node id %s: recovered %d keys from %s (%d records) in %.2f s%s%s",
            log_.node_id,
            len(self.store),
            directory,
            records,
            time.monotonic() - started,
            "" if log_.is_complete_copy else "; an incomplete copy (a join was cut short)",
            ""
            if log_.marker is None
            else "; catch-up point epoch {}, log {}, position {}".format(*log_.marker),
        )

    def run(self) -> int:
        """Serve until stopped; returns an exit code (EXIT_RESTART: start again, empty)."""
        self.server.bind()
        self.server.start()
        config = self.config
        if config.metrics_port is not None:
            host = config.metrics_host or config.host
            try:
                self._metrics_server = MetricsServer(host, config.metrics_port, self.metrics)
            except OSError as exc:  # (the caller names the service's address)
                raise errors.UnavailableError(
                    f"cannot serve metrics on {host}:{config.metrics_port}: {exc}"
                ) from None
            self._metrics_server.start()
            log.info("metrics on http://%s:%d/metrics", host, self._metrics_server.port)
        log.info(
            "connecting to ZooKeeper at %s (giving up after %g s)",
            config.zk_connect,
            config.zk_connect_timeout_s,
        )
        try:
            zk = connect(
                config.zk_connect,
                config.zk_session_timeout_s,
                config.zk_connect_timeout_s,
                config.zk_auth,
                config.zk_tls,
                is_cancelled=self._stopping.is_set,
            )
        except errors.CoordinationError:
            if self._stop_reason is None:
                raise
            self._shutdown()  # asked to stop while it waited for ZooKeeper
            return self._stop_reason.code
        self._coordinator = Coordinator(
            zk, config.zk_path, self._wakeup.set, config.zk_request_timeout_s
        )
        threading.Thread(target=self._heartbeat_loop, name="heartbeats", daemon=True).start()
        if self.store.log is not None:
            threading.Thread(target=self._snapshot_loop, name="snapshots", daemon=True).start()
        try:
            self._join_zookeeper()
        except errors.KVError:
            if self._stop_reason is not None:  # asked to stop while ZooKeeper was away
                self._shutdown()
                return self._stop_reason.code
            # No parent (NoClusterError), NoAuth (wrong credentials), a world-writable
            # parent, a twin, or ZooKeeper lost until the connect deadline: kv-node says
            # so, exit 1 (closing the session drops our znode)
            self._coordinator.close()
            raise
        self.role = Role.STANDBY
        log.info("node %s serving on %s under %s", self.name, config.address, config.zk_path)
        if self.identity is not None:
            log.info("TLS identity %s (its certificate's SHA-256 fingerprint)", self.identity)
        try:
            self._control_loop()
        except NodeExit as exc:
            # A decision taken after a stop was asked (say DATA LOST, by a control step under
            # way as SIGTERM came) does not replace why the node stops.
            self._stop_reason = self._stop_reason or exc
        finally:
            self._shutdown()
        assert self._stop_reason is not None
        return self._stop_reason.code

    def _join_zookeeper(self) -> None:
        """Check the parent and register. A connection or session lost on the way (a
        ZooKeeper blip as the node starts) is tried again until the connect deadline; an
        attempt that failed may have registered (Coordinator.register adopts that znode),
        one that succeeded is not repeated (a second znode would pose as another member at
        this address for as long as the session lasts)."""
        config, coordinator = self.config, self.require_coordinator()
        deadline = time.monotonic() + config.zk_connect_timeout_s
        name = ""
        while True:
            if coordinator.is_session_lost:
                # A session expired during an attempt: what it registered went with it, and
                # this new one is ours (the control loop would take the flag for a session
                # lost while serving and restart the node, empty, at its first step).
                coordinator.is_session_lost = False  # (a loss from now on sets it again)
                self.name = name = ""
            try:
                if not name:
                    if config.create_parent and coordinator.create_parent():
                        log.warning("created the parent znode %s (--create-parent)", config.zk_path)
                    coordinator.require_parent()
                    coordinator.check_parent_acl(
                        config.zk_auth is not None, config.zk_auth_options, config.zk_tls
                    )
                    self.name = name = coordinator.register(config.address)
                self._refuse_a_twin()
                return
            except errors.CoordinationError as exc:
                if not exc.is_transient or time.monotonic() >= deadline:
                    raise
                log.warning("%s; trying again", exc)
                if self._stopping.wait(ZK_RETRY_PAUSE_S):
                    raise

    def _refuse_a_twin(self) -> None:
        """DataDirectoryInUseError if a live member runs under this node's id: a copy of its
        data directory (cp -r) carries its ``node-id``, and two nodes under one id would pass
        for one copy in the in-sync set (the directory's lock only catches one directory
        used twice). A member counts if it answers at its address under its own name with
        our id; one that does not answer proves nothing (and is not waited for)."""
        if self.node_id is None:
            return
        coordinator = self.require_coordinator()
        config = self.config
        for member in coordinator.members():
            if member.name == self.name or member.address == config.address:
                continue  # (a znode at our address is our own, or a dead process's)
            try:
                status = probe(member.address, config.probe_timeout_ms, self.peer_tls)
            except errors.KVError:
                continue
            if status is None or not is_member(status, member.name, self.incarnation):
                continue
            if status.durable_id == self.node_id:
                directory = config.data_dir
                raise errors.DataDirectoryInUseError(
                    f"refusing to start: node {member.name} at {member.address} runs with this "
                    f"node's id {self.node_id} ({directory}/node-id): {directory} is a copy of "
                    f"its data directory; give this node a directory of its own (an empty one "
                    f"is fine: it copies the data from the primary)"
                )

    @property
    def role(self) -> Role:
        return self._role

    @role.setter
    def role(self, role: Role) -> None:
        """Once stopping, a node stays stopped: a control step under way on another thread
        (a join, a takeover) must not bring it back as standby, backup or primary."""
        self._role = role
        if self._stopping.is_set():  # (stop sets it before the role: either way, STOPPED)
            self._role = Role.STOPPED

    def stop(self, reason: str = "asked to stop", code: int = EXIT_OK) -> None:
        """Stop serving at once; the control loop winds the node down. Safe from any thread."""
        if self._stop_reason is None:
            self._stop_reason = NodeExit(code, reason)
        self._stopping.set()
        self.role = Role.STOPPED
        self._wakeup.set()

    @property
    def is_stopping(self) -> bool:
        return self._stop_reason is not None

    def wake(self) -> None:
        self._wakeup.set()

    def _shutdown(self) -> None:
        self._stopping.set()
        self.role = Role.STOPPED
        reason = self._stop_reason
        code = EXIT_OK if reason is None else reason.code
        # A restart is routine; any other status but 0 ends the node for good: an error.
        level = {EXIT_OK: logging.INFO, EXIT_RESTART: logging.WARNING}.get(code, logging.ERROR)
        log.log(
            level,
            "node %s stopping: %s",
            self.name or "(not registered yet)",
            reason,
        )
        with self._backup_lock:  # first: it releases puts waiting for their backups
            replicators, self._replicators = self._replicators, ()
            for replicator in replicators:
                replicator.close()
        self.server.close()  # and waits (bounded) for its connection threads to end
        if self._coordinator is not None:
            self._coordinator.close()
        if self.store.log is not None:
            self.store.log.close()
        if self._metrics_server is not None:
            self._metrics_server.close()

    def _metrics_state(self) -> NodeState:
        connections = getattr(self.server, "connection_count", 0)
        return NodeState(
            self.role.value, self.epoch, self._in_sync_size, len(self.store), connections
        )

    def _snapshot_loop(self) -> None:
        """Snapshot when the log has grown enough (off the request path; writes go on)."""
        log_ = self.store.log
        assert log_ is not None
        warned_at = -math.inf
        while not self._stopping.wait(self.config.snapshot_check_s):
            if log_.bytes_since_snapshot >= self.config.snapshot_every_bytes:
                why_not = log_.snapshot_room()
                if why_not is not None:
                    if time.monotonic() - warned_at >= DISK_WARNING_EVERY_S:
                        warned_at = time.monotonic()
                        log.error("no snapshot: %s (the log keeps growing; free space)", why_not)
                    continue
                started = time.monotonic()
                try:
                    self.store.write_snapshot()
                except (OSError, errors.KVError) as exc:
                    log.error("snapshot failed (the log keeps growing): %s", exc)
                    continue
                log.info(
                    "snapshot of %d keys in %.2f s", len(self.store), time.monotonic() - started
                )

    def _heartbeat_loop(self) -> None:
        """Renew the primary's lease on a thread of its own: the control loop may wait
        seconds for ZooKeeper, and a lease that lapses then would cause a needless failover."""
        interval_s = self.config.heartbeat_interval_s
        while not self._stopping.wait(interval_s / 4):
            if self.role == Role.PRIMARY:
                try:
                    self._heartbeat_if_due()
                except Exception as exc:  # dropping the backup needs ZooKeeper; try again
                    log.warning("heartbeat step failed: %r", exc)

    def _control_loop(self) -> None:
        failures = FailureLog(log, "control step")  # (ZooKeeper away: a few lines, not one a tick)
        while True:
            self._wakeup.wait(self.config.control_tick_s)
            self._wakeup.clear()
            if self._stop_reason is not None:
                raise self._stop_reason
            try:
                self._evaluate()
            except NodeExit:
                raise
            except errors.NoClusterError as exc:
                raise NodeExit(EXIT_FAILED, f"{exc}: {PARENT_GONE}") from None
            except Exception as exc:  # ZooKeeper hiccup, peer down: try again next tick
                failures.failed(str(exc) if isinstance(exc, errors.KVError) else repr(exc))
                log.debug("control step failure", exc_info=True)
                time.sleep(self.config.control_tick_s)
            else:
                failures.succeeded()

    def _evaluate(self) -> None:
        coordinator = self.require_coordinator()
        if coordinator.is_session_lost:
            self._recover_session(coordinator)
        meta, version = coordinator.meta()
        members = coordinator.members()
        if self.role == Role.STANDBY and all(m.name != self.name for m in members):
            members = self._register_again(coordinator)
        self.primary_address = meta.primary_address
        self._in_sync_size = len(meta.in_sync)
        # Our takeover's CAS landed but its reply was lost, then the session expired and
        # we registered again: the metadata names us primary by a former name.
        if (
            self.role == Role.BACKUP
            and self._follower.is_former_name(meta.primary)
            and self.cas_confirmed(meta.renamed(meta.primary, self.name), version)
        ):
            meta, version = coordinator.meta()
        if self.role is Role.STOPPED:
            return  # stop() came from another thread meanwhile: a stopping node decides nothing
        if self.role != Role.PRIMARY and meta.primary == self.name:
            # Only this node writes its own name as primary: a CAS whose reply was lost.
            self.become_primary(meta.epoch, "the metadata names this node primary", "confirmed")
        role = self.role  # (STOPPED from here on if a stop comes now: see the role setter)
        if role == Role.PRIMARY:
            self._evaluate_primary(meta, members)
        elif role == Role.BACKUP:
            self._follower.evaluate_backup(meta, version, members)
        elif role is not Role.STOPPED:  # (a stopping node is no standby: no recovery, no join)
            self._follower.evaluate_standby(meta, version, members)

    def _register_again(self, coordinator: Coordinator) -> list[Member]:
        """Our znode is gone although our session lives (another node removed it, taking us
        for dead): without one this node is never designated backup. Register anew."""
        old_name = self.name
        self.name = coordinator.register(self.config.address)
        log.warning("member znode %s was removed; registered again as %s", old_name, self.name)
        return coordinator.members()

    def _recover_session(self, coordinator: Coordinator) -> None:
        """A new ZooKeeper session: a primary or a backup re-registers and keeps its data
        (see follower.py for the backup); others restart."""
        if self.role == Role.BACKUP:
            self._follower.recover_session(coordinator)
            return
        if self.role != Role.PRIMARY:
            raise NodeExit(EXIT_RESTART, "ZooKeeper session expired; restarting empty")
        if self._session_lost_at is None:
            self._session_lost_at = time.monotonic()
            log.warning("ZooKeeper session expired; waiting for a new one to re-register")
        if not coordinator.is_usable():
            if time.monotonic() - self._session_lost_at > self.config.zk_connect_timeout_s:
                raise NodeExit(EXIT_RESTART, "ZooKeeper session expired and no new one came")
            raise errors.CoordinationError("no ZooKeeper session yet")  # retried next tick
        old_name = self.name
        try:
            new_name = coordinator.register(self.config.address)
            coordinator.is_session_lost = False
            coordinator.sync()
            meta, version = coordinator.meta()
            if meta.epoch != self.epoch or meta.primary != old_name:
                raise NodeExit(EXIT_RESTART, "session expired and another node took over")
            if not self.cas_confirmed(meta.renamed(old_name, new_name), version):
                raise NodeExit(EXIT_RESTART, "session expired and the metadata changed")
        except errors.NoClusterError:
            raise  # the control loop stops the node: a restart could only fail the same way
        except errors.CoordinationError as exc:
            raise NodeExit(EXIT_RESTART, f"session expired; could not re-register: {exc}") from None
        self.name = new_name
        self._session_lost_at = None
        log.warning("new ZooKeeper session: still primary, now registered as %s", new_name)

    def cas_confirmed(self, wanted: ClusterMeta, version: int) -> bool:
        """compare_and_set; if its outcome is unknown (connection lost), read back what won."""
        coordinator = self.require_coordinator()
        try:
            return coordinator.compare_and_set(wanted, version)
        except errors.CoordinationError:
            coordinator.sync()
            if coordinator.meta()[0] == wanted:
                return True
            raise

    def new_node_id(self) -> None:
        """A new durable id for this node's data directory, before it is listed anew (see
        wal.new_node_id); nothing without a data directory."""
        if self.store.log is None:
            return
        try:
            self.node_id = self.store.log.new_node_id()
        except OSError as exc:  # (a full disk, say: the node goes on under its id)
            log.warning(
                "could not give %s a new id (%s): still %s, so a copy of the directory made "
                "before could be taken for this node after an outage of every node",
                self.store.log.directory,
                exc.strerror or exc,
                self.node_id,
            )

    def record_incarnation(self, incarnation: str) -> None:
        """Before this node's files change for a cluster: they hold the data of cluster
        ``incarnation`` from now on ("": one whose id is unknown), and so do its memory's."""
        self.incarnation = incarnation
        if self.store.log is not None:
            self.store.log.record_incarnation(incarnation or None)

    @property
    def node_ids(self) -> frozenset[str]:
        """The ids the metadata may list this node's data directory under (none in memory)."""
        return frozenset() if self.store.log is None else self.store.log.node_ids

    def become_primary(self, epoch: int, why: str, kind: str = "takeover") -> None:
        """Serve as primary of ``epoch``; ``kind`` (takeover, recovery, new, confirmed)
        labels the failover metric."""
        self.epoch = epoch
        self.primary_address = self.config.address
        self.role = Role.PRIMARY
        self.metrics.failovers.labels(kind).inc()
        log.warning("primary now (epoch %d, %d keys): %s", epoch, len(self.store), why)

    def require_coordinator(self) -> Coordinator:
        if self._coordinator is None:
            raise errors.UnavailableError("node is starting")
        return self._coordinator

    # ----------------------------------------------------------------- primary role

    def _evaluate_primary(self, meta: ClusterMeta, members: list[Member]) -> None:
        if meta.epoch != self.epoch or meta.primary != self.name:
            raise NodeExit(EXIT_RESTART, _deposed(meta, self.incarnation))
        self._remove_dead_backups(members)
        if len(self._replicators) >= meta.replicas:
            self._let_extra_backups_go(members, meta)
        self._keep_incarnation(meta)

    def _keep_incarnation(self, meta: ClusterMeta) -> None:
        """Metadata written by an earlier version has no incarnation id: add one (this
        node's data directory's, if it records one: it holds this cluster's data; else a new
        one). Then record the metadata's in the data directory, if it is not there yet."""
        if meta.incarnation:
            self.record_incarnation(meta.incarnation)
            return
        store_log = self.store.log
        chosen = (None if store_log is None else store_log.incarnation) or new_incarnation()
        self._update_meta(lambda m: m if m.incarnation else replace(m, incarnation=chosen))
        log.info("gave the cluster metadata an incarnation id: %s", chosen)

    def _let_extra_backups_go(self, members: list[Member], meta: ClusterMeta) -> None:
        """More backups than the replication factor wants (it went down, or a designated
        backup joined while an earlier one still replicates): replicate no more to the
        extra ones, those not designated first; but only once every designated backup is a
        listed, working copy, so that no copy is let go before its replacement is one."""
        replicas = meta.replicas
        designated = {m.name for m in designated_backups(members, self.name, replicas)}
        with self._backup_lock:
            ready = {
                r.backup.name
                for r in self._replicators
                if r.is_in_sync and not r.is_broken and any(n in meta.in_sync for n in r.names)
            }
            if not designated <= ready:
                return
            # Least worth keeping first: not designated, not in sync, then the higher
            # registered (a lower one is the likelier to be designated next).
            ranked = sorted(
                self._replicators,
                key=lambda r: (r.backup.name in designated, r.is_in_sync, -r.backup.sequence),
            )
            extra = ranked[: max(0, len(self._replicators) - (replicas - 1))]
            for replicator in extra:
                self._retire_backup(replicator)
                log.warning(
                    "let backup %s go: the replication factor is %d",
                    replicator.backup.name,
                    replicas,
                )

    def _heartbeat_if_due(self) -> None:
        """Heartbeat each backup whose line has been idle for a heartbeat interval, each on a
        thread of its own: a heartbeat may block for the RPC timeout (a paused backup) and
        its drop needs ZooKeeper, while the other backups' leases (one may be joining right
        now) must go on being renewed, else a healthy backup takes over from a healthy
        primary."""
        replicators = self._replicators
        for replicator in replicators:
            is_due = (
                replicator.wants_spare_line
                or time.monotonic() - replicator.last_send_at >= self.config.heartbeat_interval_s
            )
            if not is_due or replicator.is_heartbeating:
                continue
            replicator.is_heartbeating = True
            try:
                threading.Thread(
                    target=self._heartbeat_apart,
                    args=(replicator,),
                    name=f"heartbeat-{replicator.backup.address}",
                    daemon=True,
                ).start()
            except RuntimeError:  # no thread to be had: try again on the next pass
                replicator.is_heartbeating = False
                raise

    def _heartbeat_apart(self, replicator: Replicator) -> None:
        try:
            self._heartbeat(replicator)
        except Exception as exc:  # dropping the backup needs ZooKeeper; try again
            log.warning("heartbeat of %s failed: %r", replicator.backup.address, exc)
        finally:
            replicator.is_heartbeating = False

    def _heartbeat(self, replicator: Replicator) -> None:
        """Renew the lease (and check the backup); a failed heartbeat drops the backup."""
        try:
            replicator.heartbeat()
        except BackupFailedError as exc:
            self._drop_backup(replicator, f"heartbeat failed: {exc}")

    def remove_once_dead(self, members: list[Member]) -> None:
        """Remove these members' znodes once each is proven dead (``_remove_dead_backups``;
        after a recovery from disk: the last in-sync set's, left behind by a full restart)."""
        with self._dead_backups_lock:
            self._dead_backups.extend(m for m in members if m.name != self.name)
        self._wakeup.set()

    def _remove_dead_backups(self, members: list[Member]) -> None:
        """Remove the znodes of dropped backups (and of ``remove_once_dead``'s members) once
        they are gone: another node (a restarted one) or the node itself, stopped, answers
        at the address, or nothing listens there (the process died: a crash, kill -9).
        Until then, and while their znodes last, ask again every tick: a lingering znode
        keeps a replacement from being designated backup. (A refusal is no proof of death
        to the standbys: a firewall rejecting probes looks the same. Here it costs nothing
        if the node lives: its znode gone, it registers again and waits as a standby.)"""
        with self._dead_backups_lock:  # drops may append meanwhile
            pending, self._dead_backups = self._dead_backups, []
        if not pending:
            return
        names = {m.name for m in members}
        # A dropped backup that joined again is alive: probing it every tick for as long as
        # it lives (as this did) proves nothing. (Each drop appends: once per name.)
        joined = {name for replicator in self._replicators for name in replicator.names}
        waiting: list[Member] = []
        unasked = list(dict.fromkeys(pending))
        try:
            while unasked:
                member = unasked[0]
                if member.name in names and member.name not in joined:  # (else its session
                    # ended, the znode gone with it, or it is back)
                    why = why_gone(
                        member.name,
                        member.address,
                        self.config.probe_timeout_ms,
                        self.peer_tls,
                        self.incarnation,
                    )
                    if why is None:
                        waiting.append(member)
                    else:
                        log.info(
                            "member %s (%s) is gone (%s); removing its znode",
                            member.name,
                            member.address,
                            why,
                        )
                        self.require_coordinator().remove_member(member.name)
                del unasked[0]
        finally:  # (after a ZooKeeper error the rest is asked again next tick, not dropped)
            with self._dead_backups_lock:
                self._dead_backups.extend(waiting + unasked)

    def write_group(self, writes: Sequence[Write]) -> list[bool | Exception]:
        """The primary's deletes (value None), puts and compare-and-sets (``is_conditional``:
        only if the current value is ``expected``, None meaning absent), optionally
        exactly-once, to distinct keys: decide, replicate, apply and record each under its
        key's stripe lock, all of them logged and forwarded as one batch and made durable
        with one wait. Returns each write's outcome (True if it changed the store), or the
        error that failed it.

        A request already applied gets its recorded outcome. A write that changes nothing
        (a failed compare-and-set, a delete of a missing key) is answered like a read and
        recorded nowhere: retrying it is harmless.
        """
        return self.end_writes(self.begin_writes(writes))

    def begin_writes(self, writes: Sequence[Write], sync_soon: bool = False) -> WriteGroup:
        """``write_group`` up to the backups' replies: take the stripe locks, decide, log
        and forward. A batch this thread sends on a free line is not waited for: the
        caller may wait for its ``deliveries`` as it likes, then must call ``end_writes``
        (which waits for any it did not). With ``sync_soon`` (only the event front: it polls
        the deliveries, one group at a time) the log's fsync runs on its syncer thread
        meanwhile (``durable``, to wait for like a delivery)."""
        store = self.store
        group = WriteGroup(writes, store.lock_stripes([write.key for write in writes]))
        try:
            self._decide(group)
            if group.changing:
                self._log_and_forward(group, is_polled=sync_soon)
                if sync_soon and group.logged:
                    group.durable = store.sync_soon(group.position)
        except BaseException:
            for _, delivery in group.deliveries:  # read their replies: pass the lines on
                with contextlib.suppress(BackupFailedError):
                    delivery.finish()
            store.unlock_stripes(group.locks)
            raise
        return group

    def _decide(self, group: WriteGroup) -> None:
        store, outcomes = self.store, group.outcomes
        unchanged: list[int] = []
        for i, (key, value, request, is_conditional, expected) in enumerate(group.writes):
            if request is not None:
                try:
                    prior = store.sessions_for(key).outcome(request[0], request[1])
                except errors.BadRequestError as exc:  # a late retry: it fails alone, not
                    outcomes[i] = exc  # the other clients' writes grouped with it
                    continue
                if prior is not None:
                    outcomes[i] = prior
                    continue
            current = store.get(key)
            if (value is None and current is None) or (is_conditional and current != expected):
                unchanged.append(i)
            else:
                group.changing.append(i)
        if unchanged:
            try:
                self.confirm_read()
            except Exception as exc:
                for i in unchanged:
                    outcomes[i] = exc

    def _log_and_forward(self, group: WriteGroup, is_polled: bool = False) -> None:
        """Log the changing writes with their exactly-once records and forward them to every
        backup (call with their stripe locks held). ``is_polled``: the caller is the event
        loop, which polls the deliveries' descriptors.

        The log comes first: a full disk refuses a write before anything was forwarded or
        applied (DiskFullError, definite; the writes before it go on). One lock orders
        appends and enqueues, so the log's order is the replication order.
        """
        store = self.store
        mutations = [group.writes[i][:3] for i in group.changing]
        with self._sequence_lock:
            # Read under the lock: a backup joining by catch-up gets every write logged
            # after the end of its catch-up (accept_join plans it under this lock).
            replicators = self._replicators
            positions, group.failure = store.log_writes(mutations, may_split=True)
            logged = [
                (key, value, position, record)
                for (key, value, record), position in zip(mutations, positions, strict=False)
            ]
            group.logged = len(logged)
            if logged:
                group.position = positions[-1]
            tickets = [_enqueue_many(replicator, logged) for replicator in replicators]
        if all(_takes_line(r, waiting) for r, waiting in zip(replicators, tickets, strict=True)):
            # The usual case: for every backup, one batch this thread opened on a free line:
            # send them all without waiting for the replies (nothing here waits for another
            # thread while holding a line: threads that hold lines finish them first).
            for replicator, waiting in zip(replicators, tickets, strict=True):
                try:
                    delivery = replicator.send_soon(waiting[0], is_polled)
                except BackupFailedError as exc:
                    group.failed[replicator] = str(exc)
                else:
                    if delivery is not None:
                        group.deliveries.append((replicator, delivery))
            return
        for replicator, waiting in zip(replicators, tickets, strict=True):
            if None in waiting:
                group.failed[replicator] = f"replication to {replicator.backup.address} failed"
            for ticket in waiting:  # every one, so that a batch opened here is sent
                try:
                    if ticket is not None:
                        replicator.wait(ticket)
                except BackupFailedError as exc:
                    group.failed.setdefault(replicator, str(exc))

    def end_writes(self, group: WriteGroup) -> list[bool | Exception]:
        """Finish what ``begin_writes`` began: wait for the backups (those that failed are
        dropped first), make the log durable, apply and record, release the stripe locks;
        each write's outcome, or the error that failed it. If the node stops meanwhile the
        outcome is unknown (the backups may hold the writes): that error fails them all."""
        store, outcomes = self.store, group.outcomes
        try:
            if group.changing:
                if group.durable is not None:
                    group.durable.finish()  # (whether it succeeded: wait_durable below)
                elif group.deliveries and group.logged:
                    # The backups work on the batch meanwhile: our fsync overlaps theirs.
                    with contextlib.suppress(Exception):  # raised again by wait_durable below
                        store.wait_durable(group.position)
                for replicator, delivery in group.deliveries:
                    try:
                        delivery.finish()
                    except BackupFailedError as exc:
                        group.failed.setdefault(replicator, str(exc))
                logged, failure = group.logged, group.failure
                try:
                    for replicator, reason in group.failed.items():
                        self._drop_backup(replicator, reason)
                    if self.role != Role.PRIMARY:
                        raise errors.ReplicationFailedError(
                            "node stopped while replicating; outcome unknown"
                        )
                    # Published only once logged and synced: readers take no lock.
                    store.wait_durable(group.position)
                except Exception as exc:  # deposed, ZooKeeper gone, the log failed...
                    logged, failure = 0, exc  # ... the backups may hold them: unknown
                for i in group.changing[logged:]:
                    outcomes[i] = failure  # type: ignore[assignment]
                for i in group.changing[:logged]:
                    key, value, request, _, _ = group.writes[i]
                    _, shard = store.stripe_for_write(key)
                    if value is None:
                        del shard[key]
                    else:
                        shard[key] = value
                    if request is not None:
                        client_id, seq, acked_below = request
                        store.sessions_for(key).record(key, client_id, seq, True, acked_below)
                    outcomes[i] = True
        finally:
            store.unlock_stripes(group.locks)
        return outcomes

    def read(self, key: str) -> str:
        """The seed's get: "" for a missing key."""
        value = self.lookup(key)
        return "" if value is None else value

    def lookup(self, key: str) -> str | None:
        value = self.store.get(key)
        self.confirm_read()
        return value

    def read_many(self, keys: list[str]) -> dict[str, str]:
        found = self.store.get_many(keys)
        self.confirm_read()
        return found

    def scan(self, first_stripe: int, max_entries: int, max_bytes: int, epoch: int) -> object:
        """A chunk of an export: whole stripes from ``first_stripe`` on (see the IDL's scan),
        for a reply of at most ``max_bytes``."""
        if epoch not in (0, self.epoch):  # begun on another primary: start again
            return ScanChunk(keys=[], values=[], next_stripe=0, epoch=self.epoch)
        epoch = self.epoch
        if not 0 <= first_stripe < self.store.stripe_count:
            raise errors.BadRequestError(
                f"no stripe {first_stripe} on this primary (it has {self.store.stripe_count}): "
                "a scan continues only on the primary it began on"
            )
        # snapshot_stripes counts characters (up to 4 bytes each in UTF-8) and stops only
        # once past its bound, the last stripe adding as much again: an eighth of the reply's
        # bytes keeps a chunk of CJK text or emoji within it (the handler checks the rest).
        keys, values, _, next_stripe = self.store.snapshot_stripes(
            first_stripe, max(1, max_entries), max(1, max_bytes // 8)
        )
        self.confirm_read()
        return ScanChunk(keys=keys, values=values, next_stripe=next_stripe, epoch=epoch)

    def confirm_read(self) -> None:
        """Vouch for what this node read a moment ago, or raise.

        Checked *after* reading: the thread may have been held up between the lookup and
        here, past the end of the lease. A lease still valid now was valid then; otherwise
        a heartbeat the backup accepts now proves it had not taken over (and accepted
        writes) by then.
        """
        for replicator in self._replicators:
            if replicator.is_in_sync and not replicator.has_lease:
                self._heartbeat(replicator)
        self.check_primary()

    def _observe_batch(self, seconds: float, entries: int) -> None:
        self.metrics.replication_seconds.observe(seconds)
        if entries:
            self.metrics.replication_entries.inc(entries)

    def _drop_backup(self, replicator: Replicator, reason: str) -> None:
        """Stop replicating to a failed backup; first remove it from the in-sync set."""
        with self._backup_lock:
            if replicator not in self._replicators:
                return  # already dropped (or replaced) by another thread
            was_in_sync = replicator.is_in_sync
            self._retire_backup(replicator)
        backup = replicator.backup
        if was_in_sync:
            log.warning("dropped backup %s (%s): %s", backup.name, backup.address, reason)
        else:  # no copy anyone counts on: after each failover a backup that asked to catch
            # up and must copy the store instead starts a second join and refuses the first's
            log.info("backup %s (%s) left its join: %s", backup.name, backup.address, reason)
        with self._dead_backups_lock:
            self._dead_backups.append(replicator.backup)
        self._wakeup.set()

    def _retire_backup(self, replicator: Replicator) -> None:
        """Replicate to this backup no more; first remove it from the in-sync set if it is
        in it. Call with ``_backup_lock`` held, for a current replicator."""
        catchup.unpin(self.store.log, replicator)
        if replicator.is_in_sync:
            names = replicator.names  # its former names too: a rename's CAS may have landed
            self._update_meta(lambda m: m.without_in_sync(*names))
        self._replicators = tuple(r for r in self._replicators if r is not replicator)
        replicator.close()

    def _update_meta(self, change: Callable[[ClusterMeta], ClusterMeta]) -> None:
        """CAS a change into the metadata, as primary of this epoch (else: deposed)."""
        coordinator = self.require_coordinator()
        for _ in range(self.config.meta_cas_attempts):
            coordinator.refresh()
            meta, version = coordinator.meta()
            if meta.epoch != self.epoch or meta.primary != self.name:
                self.stop(_deposed(meta, self.incarnation), EXIT_RESTART)
                raise errors.DeposedError("this node is no longer the primary")
            wanted = change(meta)
            if wanted == meta or coordinator.compare_and_set(wanted, version):
                return
        raise errors.CoordinationError("metadata kept changing; giving up this update")

    def accept_join(
        self,
        epoch: int,
        backup_name: str,
        join_id: str,
        lease_ms: int,
        durable: str | None = None,
        since: Marker | None = None,
        protocol: int = 0,
    ) -> int:
        """``protocol``: what the backup understands (see join in the IDL)."""
        self.check_primary(epoch)
        coordinator = self.require_coordinator()
        coordinator.refresh()
        meta = coordinator.meta()[0]
        replicas = meta.replicas
        designated = designated_backups(coordinator.members(), self.name, replicas)
        backup = next((m for m in designated if m.name == backup_name), None)
        if backup is None:
            raise errors.UnavailableError(f"{backup_name} is not a designated backup")
        joiner = ident.caller()  # identity pinning (TLS only; see identity.py)
        with self._backup_lock:
            self.check_primary(epoch)  # again: a shutdown may have closed the replicators
            if joiner is not None:
                ident.check_joiner(
                    meta, self._replicators, backup_name, joiner, address=backup.address
                )
            self._make_room_for(backup)
            lease_s = min(self.config.lease_s, lease_ms / 1000)  # the shorter lease rules
            replicator = Replicator(
                backup,
                epoch,
                join_id,
                lease_s,
                self.config.rpc_timeout_ms,
                self._observe_batch if self._is_metered else None,
                self.peer_tls,
                self.peer_secret,
                # the backup reads frames up to its own limit; ours is the same by default
                self.config.limits.max_frame_bytes // 2,
                # N > 2: the lines work in parallel. (With N = 2 a backup joining while an
                # earlier one still replicates is waited for after it: a short while, and a
                # sender thread for good would cost a hand-off per batch ever after.)
                has_sender=replicas > 2,
            )
            replicator.durable_id = durable
            replicator.identity = joiner  # the rest of this join must come from it
            replicator.takes_flat_records = protocol >= FLAT_RECORDS
            with self._sequence_lock:  # writes logged from here on are forwarded to it
                self._replicators = (*self._replicators, replicator)
                why_not = catchup.plan(self.store.log, self.epoch, replicator, since)
        log.info("backup %s (%s) joining: %s", backup_name, backup.address, why_not)
        return self.store.stripe_count

    def _make_room_for(self, backup: Member) -> None:
        """Before ``backup`` joins: stop replicating to an earlier join of it (it restarted,
        registered again, or starts over). Call with ``_backup_lock`` held. Backups beyond
        the replication factor are let go by the control loop, once those designated are in
        sync (``_let_extra_backups_go``): never a copy before its replacement is one."""
        for replicator in self._replicators:
            if replicator.backup.address == backup.address or backup.name in replicator.names:
                self._retire_backup(replicator)

    def sync_log(self, epoch: int, join_id: str, position: int, max_bytes: int) -> object:
        """The next records of a join's catch-up (see catchup.py)."""
        self.check_primary(epoch)
        return catchup.next_chunk(
            self.store.log, self._require_joining(join_id), position, max_bytes
        )

    def sync_chunk(self, epoch: int, join_id: str, first_stripe: int, max_entries: int) -> object:
        self.check_primary(epoch)
        self._require_joining(join_id)
        if not 0 <= first_stripe < self.store.stripe_count:
            raise errors.BadRequestError(f"no stripe {first_stripe}")
        keys, values, records, next_stripe = self.store.snapshot_stripes(
            first_stripe, max(1, max_entries), self.config.sync_chunk_bytes
        )
        changes = [  # acked_below carries the client's floor (see sessions.outcome)
            Change(k, None, client_id, seq, outcome, floor)
            for k, client_id, seq, outcome, floor in records
        ]
        return SyncChunk(keys=keys, values=values, next_stripe=next_stripe, records=changes)

    def finish_join(self, epoch: int, join_id: str) -> None:
        self.check_primary(epoch)
        with self._backup_lock:
            replicator = self._require_joining(join_id)
            catchup.unpin(self.store.log, replicator)
            # From here on reads need the new backup's lease: it may take over once in
            # sync. Never reset: if the CAS below fails its outcome may still be a success.
            replicator.is_in_sync = True
            backup_name = replicator.backup.name
            addresses = {self.name: self.config.address, backup_name: replicator.backup.address}
            ids = {self.name: self.node_id, backup_name: replicator.durable_id}
            identities = {self.name: self.identity, backup_name: replicator.identity}
            self._update_meta(
                lambda m: m.with_in_sync(
                    tuple(dict.fromkeys((self.name, *m.in_sync, backup_name))),
                    addresses,
                    ids,
                    identities,
                )
            )
        log.info("backup %s is in sync (%d keys)", backup_name, len(self.store))

    def rename_backup(self, epoch: int, join_id: str, new_name: str) -> None:
        """The in-sync backup of join ``join_id`` registered again as ``new_name`` (its
        session expired; it kept its store and this join's fence): rename it in the in-sync
        set, so that the set names a live member and that member may still take over."""
        self.check_primary(epoch)
        coordinator = self.require_coordinator()
        coordinator.refresh()
        addresses = {m.name: m.address for m in coordinator.members()}
        with self._backup_lock:
            replicator = self._require_joining(join_id)
            backup = replicator.backup
            if not replicator.is_in_sync:
                raise errors.UnavailableError(f"join {join_id} is not in sync yet")
            if backup.name == new_name:
                return  # renamed already (the reply to an earlier call was lost)
            if addresses.get(new_name) != backup.address:
                raise errors.UnavailableError(f"{new_name} is not a member at {backup.address}")
            # First: whatever the outcome of the CAS below (it may land and still raise), a
            # later drop must remove both names.
            replicator.other_names.update((backup.name, new_name))
            self._update_meta(lambda m: _renamed_in_sync(m, backup.name, new_name))
            replicator.backup = Member(new_name, backup.address)
        log.warning(
            "backup %s registered again as %s; renamed in the in-sync set", backup.name, new_name
        )

    def _require_joining(self, join_id: str) -> Replicator:
        ident.check_joining_caller(self._replicators, join_id)  # TLS: its backup only
        for replicator in self._replicators:
            if replicator.join_id == join_id and not replicator.is_broken:
                return replicator
        raise errors.UnavailableError(f"join {join_id} is not in progress (it was reset)")

    def check_primary(self, epoch: int | None = None) -> None:
        if self._role is not Role.PRIMARY:  # (every request: the attribute, not the property)
            if self._role is Role.STOPPED:
                raise errors.UnavailableError(f"node {self.name} is stopping")
            hint = (
                f" {errors.NOT_PRIMARY_HINT}{self.primary_address}" if self.primary_address else ""
            )
            raise errors.NotPrimaryError(
                f"node {self.name} is {self.role.value}, not the primary.{hint}"
            )
        if epoch is not None and epoch != self.epoch:
            raise errors.StaleEpochError(f"epoch {epoch} is not the current epoch {self.epoch}")

    # ----------------------------------------------------------------- follower role

    def apply_replicated(
        self,
        epoch: int | None,
        keys: list[str],
        values: list[str],
        join_id: str | None,
        changes: list[Any],
        log_mark: Marker | None = None,
        records: FlatRecords | None = None,
    ) -> None:
        self._follower.apply_replicated(epoch, keys, values, join_id, changes, log_mark, records)

    # ----------------------------------------------------------------- introspection

    def snapshot(self) -> dict[str, str]:
        return self.store.snapshot()

    def status(self) -> object:
        return NodeStatus(
            node_id=self.name,
            role=self.role.value,
            epoch=self.epoch,
            key_count=len(self.store),
            primary_address=self.primary_address,
            durable_id=self.node_id,
            # Only while it holds this cluster's copy: a standby keeps the incarnation it last
            # served, which after a reset is no longer its cluster's (kv status called such
            # a live standby "stale").
            incarnation=(self.incarnation or None) if self.role in _HOLDS_A_COPY else None,
        )


_HOLDS_A_COPY = (Role.SYNCING, Role.BACKUP, Role.PRIMARY)


def _takes_line(replicator: Replicator, tickets: list[Any]) -> bool:
    """Whether ``tickets`` (one backup's, for a group of writes) are all in one batch that
    their first write opened on a free line (so its thread sends it), or that the backup's
    sender thread sends."""
    if not tickets or tickets[0] is None:
        return False
    batch, is_opener, is_line_free = tickets[0]
    return (replicator.has_sender or (is_opener and is_line_free)) and all(
        t is not None and t[0] is batch for t in tickets
    )


def _enqueue_many(
    replicator: Replicator, writes: list[tuple[str, str | None, int, RequestRecord | None]]
) -> list[Any]:
    """``replicator.enqueue_many``'s tickets, or [None] if the replicator failed (the caller
    drops it). On every write's path: a try costs less than a suppress() context."""
    if not writes:
        return []
    try:
        return replicator.enqueue_many(writes)
    except BackupFailedError:
        return [None]


def _renamed_in_sync(meta: ClusterMeta, old: str, new: str) -> ClusterMeta:
    if new in meta.in_sync:
        return meta  # an earlier rename went through
    if old not in meta.in_sync:
        raise errors.UnavailableError(f"{old} is not in the in-sync set")
    return meta.renamed(old, new)


def _tls_files(tls: TlsConfig) -> tuple[str, str, str]:
    return tls.cert_path, tls.key_path, tls.ca_path


def _deposed(meta: ClusterMeta, incarnation: str) -> str:
    """Why a primary of cluster ``incarnation`` steps down, seeing ``meta`` (the metadata
    no longer names it). A reset gives the metadata a new incarnation: seen as such even
    once a new primary serves it."""
    is_reset = bool(incarnation and meta.incarnation and meta.incarnation != incarnation)
    if not meta.is_initialized or is_reset:
        return (
            "deposed: the cluster metadata was reset (kv-createznode --reset): a new, empty cluster"
        )
    return f"deposed: epoch {meta.epoch} primary is {meta.primary}"
