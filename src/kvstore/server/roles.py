"""What every node role shares: the role names, how a node exits, the death proof, and the
slice of the node (:class:`NodeCore`) that a role collaborator may use."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol

from kvstore import errors
from kvstore.coordination import is_member
from kvstore.rpc import probe

if TYPE_CHECKING:
    from kvstore.config import NodeConfig
    from kvstore.coordination import ClusterMeta, Coordinator, Member
    from kvstore.server.metrics import NodeMetrics
    from kvstore.server.storage import StripedStore

EXIT_OK = 0
EXIT_FAILED = 1  # cannot go on: the reason is logged (parent znode gone, a data directory
# it must not use for a new cluster)
EXIT_DATA_LOST = 3  # not 2: that is a usage error (argparse)
EXIT_RESTART = 75  # the CLI re-executes the node with the same arguments


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


NOTHING_LISTENS = "nothing listens at its address"


def why_gone(
    name: str, address: str, timeout_ms: int, tls: Any = None, incarnation: str = ""
) -> str | None:
    """Why no process serves ``name`` (of cluster ``incarnation``) at ``address`` any more,
    as far as one probe tells: another node answers there (nodes never share a port: no
    SO_REUSEPORT; see is_member), the node itself says it stopped, or NOTHING_LISTENS
    there (a refused connection). None: it answers as itself, or not in time (it may be
    paused), or no address is known."""
    if not address:
        return None
    try:
        status = probe(address, timeout_ms, tls)
    except errors.KVError:
        return None
    if status is None:
        return NOTHING_LISTENS
    if not is_member(status, name, incarnation):
        return f"{status.node_id} answers at its address"
    if status.role == Role.STOPPED.value:
        return "it stopped"
    return None


def is_dead(
    name: str, address: str, timeout_ms: int, tls: Any = None, incarnation: str = ""
) -> bool:
    """True only if no process serves ``name`` (of cluster ``incarnation``) at ``address``
    any more: see why_gone. A refused connection is *not* proof here: a firewall rejecting
    the prober produces it too while the node goes on serving (on a lease). (The primary
    takes it as enough to remove the znode of a backup it dropped, StorageNode.
    _remove_dead_backups: there a live node only loses its place, and registers again.)
    """
    reason = why_gone(name, address, timeout_ms, tls, incarnation)
    return reason is not None and reason != NOTHING_LISTENS


class NodeCore(Protocol):
    """The node's state and helpers that the follower roles use (StorageNode implements it)."""

    config: NodeConfig
    store: StripedStore
    role: Role
    epoch: int
    name: str
    node_id: str | None  # with a data directory: kept across restarts, new for each listing
    peer_tls: Any  # the TLS context of the node's calls to other nodes (None: plaintext)
    peer_secret: bytes | None  # the cluster secret its calls to other nodes prove (None: none)
    identity: str | None  # its certificate's identity (server/identity.py; None: no TLS)
    metrics: NodeMetrics

    @property
    def is_stopping(self) -> bool: ...

    def wake(self) -> None:
        """Run the control loop's next step now."""

    def require_coordinator(self) -> Coordinator: ...
    def new_node_id(self) -> None: ...
    def record_incarnation(self, incarnation: str) -> None: ...
    @property
    def node_ids(self) -> frozenset[str]: ...

    def cas_confirmed(self, wanted: ClusterMeta, version: int) -> bool: ...

    def become_primary(self, epoch: int, why: str, kind: str = "takeover") -> None: ...

    def remove_once_dead(self, members: list[Member]) -> None:
        """As primary, remove these members' znodes once each is proven dead (is_dead)."""
