"""What every node of a cluster says about itself, with ZooKeeper's view (for ``kv status``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from kvstore import errors
from kvstore.client.locator import no_parent_error, tls_context
from kvstore.config import ClientConfig
from kvstore.coordination import ClusterMeta, ClusterView, connect, is_member
from kvstore.rpc import probe


@dataclass(frozen=True, slots=True)
class NodeReport:
    name: str
    address: str
    # What the node says; "unreachable"; "stale": another node (a restarted one, or one of
    # another cluster) answers at this znode's address, the znode outlives its node until its
    # ZooKeeper session expires; "unknown": it answers but has no status call (the seed's
    # nodes); "forbidden": the connection failed the TLS check, on either side (plaintext
    # at a TLS node, a certificate one side does not trust).
    # ``error``: why a node that may be alive did not answer (None when nothing listens at
    # its address).
    role: str
    epoch: int
    is_in_sync: bool
    keys: int | None
    error: str | None = None

    @property
    def serving_epoch(self) -> int | None:
        """The epoch it serves under as primary or backup (None otherwise: a standby's is
        the last one it served under, or 0)."""
        return self.epoch if self.role in SERVING_ROLES and self.epoch else None

    def as_dict(self) -> dict[str, Any]:
        """For ``kv -o json status``: ``epoch`` is null unless it serves (see
        ``serving_epoch``); ``is_in_sync``: the metadata lists it in sync (a node that stopped
        stays listed until the primary drops it): check ``role`` too."""
        fields = asdict(self)
        fields["epoch"] = self.serving_epoch
        return fields


SERVING_ROLES = ("primary", "backup")
MAX_PROBES_AT_ONCE = 32


def cluster_state(
    config: ClientConfig, probe_timeout_ms: int = 1000
) -> tuple[ClusterMeta, list[NodeReport]]:
    """The cluster metadata, and one report per registered node, lowest first. Raises
    CoordinationError if ZooKeeper cannot be read or the parent path does not exist."""
    zk = connect(
        config.zk_connect,
        config.zk_session_timeout_s,
        config.zk_connect_timeout_s,
        tls=config.zk_tls,
    )
    try:
        view = ClusterView(zk, config.zk_path, lambda: None, config.zk_request_timeout_s)
        if not view.exists():
            raise no_parent_error(config)
        meta, _ = view.meta()
        members = view.members()
    finally:
        zk.stop()
        zk.close()
    tls = tls_context(config.tls)
    # All at once: a paused or silent node costs the probe timeout once, not once per node.
    with ThreadPoolExecutor(max(1, min(len(members), MAX_PROBES_AT_ONCE))) as pool:
        reports = pool.map(
            lambda m: _report(m.name, m.address, meta, probe_timeout_ms, tls), members
        )
        return meta, list(reports)


def _report(name: str, address: str, meta: ClusterMeta, timeout_ms: int, tls: Any) -> NodeReport:
    is_in_sync = name in meta.in_sync
    try:
        status = probe(address, timeout_ms, tls)
    except errors.ProtocolError:  # it answered, but not with a status
        return NodeReport(name, address, "unknown", 0, is_in_sync, None)
    except errors.ForbiddenError as exc:
        return NodeReport(name, address, "forbidden", 0, is_in_sync, None, str(exc))
    except errors.KVError as exc:  # a timeout, a TLS failure: it may be alive
        return NodeReport(name, address, "unreachable", 0, is_in_sync, None, str(exc))
    if status is None:  # nothing listens there
        return NodeReport(name, address, "unreachable", 0, is_in_sync, None)
    if status.node_id and not is_member(status, name, meta.incarnation):
        return NodeReport(name, address, "stale", 0, is_in_sync, None)
    return NodeReport(name, address, status.role, status.epoch, is_in_sync, status.key_count)
