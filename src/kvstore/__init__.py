"""kvstore: a fault-tolerant, replicated key-value store.

    import kvstore

    with kvstore.Client("127.0.0.1:2181", "/kvstore") as kv:
        kv.put("k", "v")
        kv.get("k")                  # "v"; None when the key does not exist
        kv.delete("k")               # True if it existed
        kv.cas("k", None, "w")       # compare-and-set; expected None: only if absent
        kv.get_many(["a", "b"])      # {"a": ..., "b": None}

Every error is a :class:`KVError`; ``err.is_definite`` says the operation was certainly
not applied. Nodes serve the seed's Thrift service and coordinate through ZooKeeper.
"""

import logging
from typing import TYPE_CHECKING, Any

from kvstore.errors import (
    BadRequestError,
    ConnectError,
    ConnectionLostError,
    CoordinationError,
    DataLostError,
    DeadlineExceededError,
    DiskFullError,
    ForbiddenError,
    KVError,
    NotPrimaryError,
    ProtocolError,
    ReplicationFailedError,
    StaleEpochError,
    TooLargeError,
    UnavailableError,
    UnsupportedError,
)

__version__ = "0.3.0"

# A library logs, the application decides where to (no last-resort stderr lines).
logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from kvstore.client.client import Client, TlsConfig


def __getattr__(name: str) -> Any:
    """``kvstore.Client`` is imported on first use: ``import kvstore.check`` stays light."""
    if name == "Client":
        from kvstore.client.client import Client

        return Client
    if name == "TlsConfig":  # Client(..., tls=TlsConfig(cert_path, key_path, ca_path))
        from kvstore.client.client import TlsConfig

        return TlsConfig
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")


__all__ = [
    "BadRequestError",
    "Client",
    "ConnectError",
    "ConnectionLostError",
    "CoordinationError",
    "DataLostError",
    "DeadlineExceededError",
    "DiskFullError",
    "ForbiddenError",
    "KVError",
    "NotPrimaryError",
    "ProtocolError",
    "ReplicationFailedError",
    "StaleEpochError",
    "TlsConfig",
    "TooLargeError",
    "UnavailableError",
    "UnsupportedError",
    "__version__",
]
