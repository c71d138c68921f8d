"""Frozen configuration records. Units are in the names: *_s seconds, *_ms milliseconds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """What a node accepts from clients. Requests beyond these get TOO_LARGE."""

    max_key_bytes: int = 1024
    max_value_bytes: int = 1024 * 1024
    # Largest frame a node reads; anything larger closes the connection unread.
    max_frame_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class NodeConfig:
    host: str
    port: int
    zk_connect: str
    zk_path: str
    limits: Limits = Limits()
    stripe_count: int = 256
    # ZooKeeper session. Failover does not wait for it: a dead primary is detected by the
    # backup directly (closed replication connection + probe) or by lease expiry.
    zk_session_timeout_s: float = 10.0
    zk_connect_timeout_s: float = 15.0
    # The primary serves reads only while it holds a lease from its in-sync backup; the backup
    # promises not to take over before the lease it granted has run out.
    lease_s: float = 1.0
    heartbeat_interval_s: float = 0.1
    # A backup suspects the primary after this long without hearing from it.
    suspect_after_s: float = 0.5
    rpc_timeout_ms: int = 2000
    probe_timeout_ms: int = 300
    sync_chunk_entries: int = 20000

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    zk_connect: str
    zk_path: str
    rpc_timeout_ms: int = 2000
    connect_timeout_ms: int = 500
    zk_connect_timeout_s: float = 10.0
