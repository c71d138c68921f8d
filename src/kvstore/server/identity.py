"""Identity pinning under mutual TLS: which node certificate may replicate and join.

The role (OU=node) says a peer is *a* node; the identity says *which* one. A node's identity
is its certificate's SHA-256 fingerprint (rpc.tls.certificate_identity), learned when it
starts from its own ``--tls-cert``; a caller's is the certificate on its connection
(``caller``: set once per connection by the server, None without TLS). The rules:

- Primary, ``join``: a backup name the in-sync set lists with an identity (the metadata,
  written by the primary when it became primary and when it listed the backup) may join
  again only from that identity; a name the current join pinned, only from the pinned one.
  Otherwise the joiner is not listed yet, and its join connection's certificate is the
  identity the primary pins for this join (first come: see SECURITY.md).
- Primary, ``sync_fetch``, ``sync_log``, ``join_done``, ``backup_renamed``: only from the
  identity pinned for the current join. The primary's own lines to the backup require the
  backup to show it too (Connection.expected_identity).
- Backup, ``replicate_batch``: only from the identity of the primary it joined (the
  metadata's for that primary, or the certificate on its join connection: the same, when
  the metadata has one), checked before the epoch and join id.

Without TLS nothing is pinned and nothing is checked (not even the thread-local is read on
the replication path). With one certificate shared by every node, all nodes are one
identity: the checks always pass, and add nothing to the role check.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NoReturn

from kvstore import errors
from kvstore.rpc import own_identity, peer_identity, short_identity

if TYPE_CHECKING:
    from kvstore.coordination import ClusterMeta
    from kvstore.server.replication import Replicator

caller = peer_identity
__all__ = [
    "caller",
    "check_joiner",
    "check_joining_caller",
    "check_primary",
    "own_identity",
]


def check_joiner(
    meta: ClusterMeta,
    replicators: Iterable[Replicator],
    backup_name: str,
    joiner: str,
    *,
    address: str,
) -> None:
    """ForbiddenError unless ``joiner`` (the join connection's identity) may join as
    ``backup_name`` at ``address``: the identity the in-sync set lists that name with, and
    the one a join in progress for that name (among ``replicators``) pinned, if any; and
    the same for whatever is listed, or joined, at that address (a backup that registered
    again has a new name at its old address: a join there replaces it). The name is
    checked first: its refusal says more."""
    for name in sorted(meta.in_sync, key=lambda n: n != backup_name):
        pinned = meta.identity_of(name)
        if pinned in (None, joiner):
            continue
        if name == backup_name:
            _refuse(f"join as {backup_name} refused: the in-sync set lists it with", pinned, joiner)
        if meta.address_of(name) == address:
            why = f"join at {address} refused: the in-sync set lists {name} there with"
            _refuse(why, pinned, joiner)
    for replicator in sorted(replicators, key=lambda r: backup_name not in r.names):
        pinned = replicator.identity
        if pinned in (None, joiner):
            continue
        if backup_name in replicator.names:
            _refuse(
                f"join as {backup_name} refused: its join in progress came from", pinned, joiner
            )
        if replicator.backup.address == address:
            why = f"join at {address} refused: the join in progress there came from"
            _refuse(why, pinned, joiner)


def _refuse(why: str, pinned: str | None, joiner: str) -> NoReturn:
    raise errors.ForbiddenError(
        f"{why} certificate {short_identity(pinned)}; this caller shows {short_identity(joiner)}"
    )


def check_joining_caller(replicators: Iterable[Replicator], join_id: str) -> None:
    """ForbiddenError unless the caller is the backup of join ``join_id`` (the identity it
    pinned), or, if no join in progress has that id, the backup of one of them: a caller
    that is no joining backup is refused whatever join id it names. Nothing is checked
    when no join pinned an identity (no TLS)."""
    pinned = [r for r in replicators if r.identity is not None]
    if not pinned:
        return
    own = next((r for r in pinned if r.join_id == join_id), None)
    allowed = {own.identity} if own is not None else {r.identity for r in pinned}
    identity = caller()
    if identity not in allowed:
        expected = ", ".join(sorted(short_identity(i) for i in allowed))
        raise errors.ForbiddenError(
            f"refused: the join in progress belongs to certificate {expected}; "
            f"this caller shows {short_identity(identity)}"
        )


def check_primary(pinned: str) -> None:
    """ForbiddenError unless the caller is the primary this backup joined (``pinned``)."""
    identity = caller()
    if identity != pinned:
        raise errors.ForbiddenError(
            f"replicate refused: this node replicates only from the primary it joined "
            f"(certificate {short_identity(pinned)}); this caller shows "
            f"{short_identity(identity)}"
        )
