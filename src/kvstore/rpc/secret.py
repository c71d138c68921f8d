"""A shared cluster secret that makes a connection a node's, without TLS: a challenge-response
once per connection, nothing per request.

Exchange (two calls, right after connecting; see kvstore.thrift):

1. ``auth_challenge()``: the node answers a fresh random nonce for this connection.
2. ``authenticate(client_nonce, proof)`` with ``proof = prove(secret, CALLER, nonce,
   client_nonce, address)``, ``address`` the host:port the caller dialed: the node checks
   it (constant-time) against its own advertised address and answers its own
   ``prove(secret, NODE, nonce, client_nonce, address)``, which the caller checks in turn.
   From then on the node treats the connection as a node's: it may call the node-only
   methods.

Invariants: a nonce serves one ``authenticate`` attempt only (right or wrong), so a proof
seen on the wire is worth nothing on another connection; the two proofs differ by their
role label, so a node's answer cannot be played back as a caller's proof; both name the
address the caller dialed, so an exchange cannot be relayed: a process at another address
(say a dead member's, which a node still dials) that passes a node's messages on to a live
node and back proves nothing to either (the proofs name its address, not the live node's);
the secret never travels. While a cluster is upgraded from 0.2 (kv-node
``--cluster-secret-upgrade``: a ClusterSecret that ``accepts_v1``) 0.2's exchange, which
names no address, is accepted too, and tried with a node that refuses ours. What it does
not do: protect the connection afterwards. Someone who can alter traffic on the wire can
take over an authenticated connection; use TLS against that.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from typing import Any

from kvstore import errors

CHALLENGE_METHOD = "auth_challenge"
AUTHENTICATE_METHOD = "authenticate"
CONNECTION_METHODS = frozenset({CHALLENGE_METHOD, AUTHENTICATE_METHOD})
NONCE_BYTES = 32
MIN_SECRET_BYTES = 16
CALLER = b"caller"
NODE = b"node"
_LABELS = {1: b"kvstore cluster secret v1\0", 2: b"kvstore cluster secret v2\0"}


class ClusterSecret(bytes):
    """The secret's bytes; ``accepts_v1``: also 0.2's exchange (no address: an exchange can
    be relayed), accepted from callers and tried with a node that refuses ours. Only while
    a cluster with a secret is upgraded from 0.2 one node at a time (kv-node
    --cluster-secret-upgrade); then each node is restarted without it. Plain bytes are a
    secret that does not."""

    accepts_v1 = False

    @classmethod
    def for_upgrade(cls, secret: bytes) -> ClusterSecret:
        upgrading = cls(secret)
        upgrading.accepts_v1 = True
        return upgrading


def accepts_v1(secret: bytes) -> bool:
    return getattr(secret, "accepts_v1", False)


def load_cluster_secret(path: str) -> bytes:
    """The secret in ``path`` (its bytes, surrounding whitespace stripped). ValueError, with
    the fix, if group or others may access the file (as ssh refuses such a key) or if it
    holds fewer than MIN_SECRET_BYTES bytes."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise ValueError(
                f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}): "
                f"the cluster secret must be private to its owner (chmod 600 {path})"
            )
        with open(path, "rb") as file:
            secret = file.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the cluster secret: {exc.strerror}: {path}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{path} holds {len(secret)} bytes; a cluster secret needs at least "
            f"{MIN_SECRET_BYTES} (e.g. head -c 32 /dev/urandom | base64 > {path})"
        )
    return secret


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def prove(
    secret: bytes, role: bytes, nonce: bytes, client_nonce: bytes, address: str, version: int = 2
) -> bytes:
    """HMAC-SHA256 over the role label, both nonces (fixed lengths: no ambiguity) and the
    address the caller dialed (the node's advertised host:port); ``version`` 1: 0.2's
    proof, without the address."""
    named = address.encode() if version == 2 else b""
    message = _LABELS[version] + role + b"\0" + nonce + client_nonce + named
    return hmac.new(secret, message, hashlib.sha256).digest()


class PeerRole:
    """What one server connection may do: ``is_node`` (call the node-only methods).

    Without a secret the role is the certificate's (a plaintext peer counts as a node, as
    in the seed); with one, the connection is a node's only once it authenticated, and then
    only if its certificate (under TLS) is a node's too. (The peer's identity under TLS
    reaches the handler by rpc.server.peer_identity.)
    """

    __slots__ = ("_nonce", "is_node", "is_node_certificate", "needs_secret", "peer")

    def __init__(self, is_node_certificate: bool, needs_secret: bool, peer: str = "") -> None:
        self.is_node_certificate = is_node_certificate
        self.needs_secret = needs_secret
        self.peer = peer  # host:port of the other side, for log lines
        self.is_node = is_node_certificate and not needs_secret
        self._nonce = b""

    def challenge(self) -> bytes:
        self._nonce = new_nonce()
        return self._nonce

    def authenticate(
        self, secret: bytes | None, client_nonce: Any, proof: Any, address: str
    ) -> bytes:
        """Check the caller's proof for this connection's nonce (used up either way) and
        this node's advertised ``address``; the node's own proof. ForbiddenError if it does
        not hold."""
        nonce, self._nonce = self._nonce, b""
        if secret is None:
            raise errors.ForbiddenError("this node has no cluster secret (--cluster-secret-file)")
        if not nonce:
            raise errors.ForbiddenError(f"{AUTHENTICATE_METHOD} needs a fresh {CHALLENGE_METHOD}")
        if not (isinstance(client_nonce, bytes) and len(client_nonce) == NONCE_BYTES):
            raise errors.ForbiddenError(f"the caller's nonce must be {NONCE_BYTES} bytes")
        if not isinstance(proof, bytes):
            proof = b""
        for version in (2, 1) if accepts_v1(secret) else (2,):
            if hmac.compare_digest(
                proof, prove(secret, CALLER, nonce, client_nonce, address, version)
            ):
                self.is_node = self.is_node_certificate
                return prove(secret, NODE, nonce, client_nonce, address, version)
        raise errors.ForbiddenError(
            f"wrong cluster secret, or a proof made for another address than {address}"
        )

    def refusal(self, method: str, node_unit: str) -> str:
        """Why this connection may not call the node-only ``method``."""
        if not self.is_node_certificate:
            return (
                f"{method} is for nodes only: this peer's certificate is a client's "
                f"(a node's has OU={node_unit})"
            )
        return (
            f"{method} is for nodes only: this connection has not proven it knows the "
            f"cluster secret ({CHALLENGE_METHOD}, then {AUTHENTICATE_METHOD})"
        )


def authenticate_connection(call: Any, secret: bytes, address: str, version: int = 2) -> None:
    """The caller's side, over ``call(method, *args)`` on a new connection to ``address``:
    prove the secret, and check that the node there knows it too. ForbiddenError if either
    fails. ``version`` 1: 0.2's exchange (see ClusterSecret)."""
    nonce = call(CHALLENGE_METHOD)
    client_nonce = new_nonce()
    proof = prove(secret, CALLER, nonce, client_nonce, address, version)
    answer = call(AUTHENTICATE_METHOD, client_nonce, proof)
    expected = prove(secret, NODE, nonce, client_nonce, address, version)
    if not (isinstance(answer, bytes) and hmac.compare_digest(answer, expected)):
        raise errors.ForbiddenError(f"{address} does not know the cluster secret")
