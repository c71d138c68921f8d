"""The kvstore exception tree. No package imports.

Every error says whether the operation it interrupted is *definite* (certainly
not applied: safe to retry as the same operation) or *indefinite* (it may have
been applied: a client must record it as unknown, never silently retry it).

On the wire, a node's refusal is a TApplicationException whose ``type`` is one
of the codes below; :func:`from_code` turns it back into the matching class.
"""

from __future__ import annotations


class KVError(Exception):
    """Root of all kvstore errors."""

    code = 0
    is_definite = True

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, is_definite={self.is_definite})"


class NotPrimaryError(KVError):
    """A get/put reached a non-primary node. ``primary_address`` may hint the right one."""

    code = 100

    def __init__(self, message: str = "", primary_address: str = "") -> None:
        super().__init__(message)
        self.primary_address = primary_address


class UnavailableError(KVError):
    """The node cannot serve right now (starting, syncing, stopping); nothing was applied."""

    code = 101


class TooLargeError(KVError):
    """A key or value exceeds the configured limit."""

    code = 102


class BadRequestError(KVError):
    """A malformed request: a missing argument or an argument of the wrong type."""

    code = 103


class StaleEpochError(KVError):
    """A replicate came from a node that is not (or no longer) the current primary."""

    code = 104


class ReplicationFailedError(KVError):
    """The primary could not confirm replication; the put may or may not survive."""

    code = 105
    is_definite = False


class DataLostError(KVError):
    """No node holds a complete copy of the data any more. The store refuses to serve."""

    code = 106


class ForbiddenError(KVError):
    """This connection may not call this method: a node-only one from a client's certificate
    or, on nodes with a cluster secret, before proving it; or a wrong cluster secret."""

    code = 107


class DiskFullError(KVError):
    """The node's disk is full: the write was refused before anything was logged, forwarded
    or applied anywhere (definite). Reads go on; writes succeed again once space is freed."""

    code = 108


class DataDirectoryInUseError(KVError):
    """Another node holds the data directory (its lock file): this one refuses to start."""


class ConnectError(KVError):
    """Could not connect: the request was certainly not sent."""

    def __init__(self, message: str = "", is_refused: bool = False) -> None:
        super().__init__(message)
        self.is_refused = is_refused


class ConnectionLostError(KVError):
    """The connection failed after the request was (maybe) sent: outcome unknown."""

    is_definite = False


class ProtocolError(KVError):
    """The peer answered with something that is not a valid reply."""

    is_definite = False


class CoordinationError(KVError):
    """ZooKeeper is unreachable, or the cluster metadata is not what it must be.
    ``is_transient``: the connection or session was lost on the way (trying again may
    work), not an answer."""

    is_transient = False


class NoClusterError(CoordinationError):
    """The cluster's parent znode does not exist: nobody created it (``kv-createznode``
    does), or it was deleted. A node never re-creates it on its own: that would start a
    new, empty cluster in its place."""


class NotAClusterError(CoordinationError):
    """The parent path exists but is no cluster's parent: a znode holding other data, a
    node's (ephemeral) registration, or ZooKeeper's own ``/zookeeper``. Nodes refuse to
    register under it, and kv-createznode to adopt it."""


class DeposedError(KVError):
    """This node learnt that another node became primary; it must stop acting as primary."""

    is_definite = False


class UnsupportedError(KVError):
    """The cluster cannot do this (e.g. delete or compare-and-set on the seed's nodes)."""


class DeadlineExceededError(KVError):
    """The call's timeout ran out while retrying. ``is_definite`` is True only if no
    attempt could have been applied; ``last_error`` is the last attempt's error."""

    def __init__(self, message: str, is_definite: bool, last_error: KVError | None) -> None:
        super().__init__(message)
        self.is_definite = is_definite
        self.last_error = last_error


_BY_CODE: dict[int, type[KVError]] = {
    cls.code: cls
    for cls in (
        NotPrimaryError,
        UnavailableError,
        TooLargeError,
        BadRequestError,
        StaleEpochError,
        ReplicationFailedError,
        DataLostError,
        ForbiddenError,
        DiskFullError,
    )
}

NOT_PRIMARY_HINT = "primary="


def from_code(code: int, message: str) -> KVError:
    """Rebuild the error a node sent as a TApplicationException (type=code)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return ProtocolError(f"node error (type {code}): {message}")
    if cls is NotPrimaryError:
        return NotPrimaryError(message, primary_address=_hint(message))
    return cls(message)


def _hint(message: str) -> str:
    for word in message.split():
        if word.startswith(NOT_PRIMARY_HINT):
            return word[len(NOT_PRIMARY_HINT) :].strip(".,;")
    return ""
