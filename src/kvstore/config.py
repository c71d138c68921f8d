"""Frozen configuration records: every tunable of a node and a client lives here.

Units are in the names: *_s seconds, *_ms milliseconds, *_bytes bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

MIB = 1024 * 1024
# Defaults shared by several records.
ZK_SESSION_TIMEOUT_S = 10.0
ZK_REQUEST_TIMEOUT_S = 5.0  # kazoo would otherwise queue a request until it reconnects
ZK_RECONNECT_MAX_DELAY_S = 1.0  # longest pause between two attempts to reach ZooKeeper


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Mutual TLS (1.3 only): this side's certificate and key, and the CA that signs every
    peer's certificate (PEM files). A certificate whose subject has OU=node is a *node* (it may
    call the replication and state-transfer methods); any other one from the CA is a *client*.
    """

    cert_path: str
    key_path: str
    ca_path: str


@dataclass(frozen=True, slots=True)
class Limits:
    """What a node accepts from clients. Requests beyond these get TOO_LARGE."""

    max_key_bytes: int = 1024
    max_value_bytes: int = MIB
    # Largest frame a node reads; anything larger closes the connection unread.
    max_frame_bytes: int = 16 * MIB
    # Connections served at once; one more gets UNAVAILABLE "too many connections" and is closed.
    max_connections: int = 1024
    # A client connection with no request for this long is closed (the primary's replication
    # connections are exempt). A frame must arrive whole within frame_deadline_s of its first byte.
    idle_timeout_s: float = 300.0
    frame_deadline_s: float = 10.0
    # Reply bytes the node holds that its clients have not read, across connections: past
    # it, a large reply (over 64 KiB) is answered UNAVAILABLE "busy" instead (rpc/budget.py).
    reply_budget_bytes: int = 256 * MIB

    @classmethod
    def for_sizes(cls, max_key_bytes: int, max_value_bytes: int) -> Limits:
        """Limits whose frame bound fits a request carrying the largest key and value."""
        frame = max(16 * MIB, 2 * (max_key_bytes + max_value_bytes) + 4096)
        return cls(max_key_bytes, max_value_bytes, frame)


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
    zk_session_timeout_s: float = ZK_SESSION_TIMEOUT_S
    zk_connect_timeout_s: float = 15.0
    zk_request_timeout_s: float = ZK_REQUEST_TIMEOUT_S
    # The primary serves reads only while it holds a lease from its in-sync backup; the backup
    # promises not to take over before the lease it granted has run out.
    lease_s: float = 1.0
    heartbeat_interval_s: float = 0.1
    # A backup suspects the primary after this long without hearing from it.
    suspect_after_s: float = 0.5
    rpc_timeout_ms: int = 2000
    probe_timeout_ms: int = 300
    # A joining backup's calls to the primary (a snapshot chunk may take a while to copy).
    join_rpc_timeout_ms: int = 10_000
    sync_chunk_entries: int = 20000
    sync_chunk_bytes: int = 4 * MIB
    # Incremental catch-up: log bytes per sync_log (the backup holds its stripe locks while it
    # applies one, so the primary's writes wait that long for their acknowledgement).
    catch_up_chunk_bytes: int = MIB
    # The control loop runs at least this often (and at once when something changes).
    control_tick_s: float = 0.05
    # Compare-and-set attempts of one metadata change before giving up (others keep changing it).
    meta_cas_attempts: int = 20
    # Create the parent znode when it is missing (kv-node --create-parent), as kv-createznode
    # would with the node's credentials, instead of refusing to start. Only at start: a node
    # never re-creates a parent deleted while it ran (coordination.py).
    create_parent: bool = False
    # host:port registered in ZooKeeper when it differs from the bound one (e.g. 0.0.0.0).
    advertise: str | None = None
    # Prometheus metrics and /healthz on this port (None: off; 0: any free port).
    metrics_port: int | None = None
    # The address the metrics port binds (None: the node's host).
    metrics_host: str | None = None
    # Serve the clients' data calls on one event-driven thread (rpc/front.py), else every
    # connection on a thread of its own.
    event_front: bool = True
    # Durability (server/wal.py): without a data directory the store lives in memory only.
    data_dir: str | None = None
    fsync: str = "batch"  # always | batch | never
    snapshot_every_bytes: int = 64 * MIB  # snapshot (and trim the log) after this much log
    snapshot_check_s: float = 1.0
    # ZooKeeper digest credentials "user:password": the node authenticates with them and
    # every znode it creates is writable only by them (readable by anyone). None: world-open.
    zk_auth: str | None = field(default=None, repr=False)
    # The file they were read from (--zk-auth-file), if any: see zk_auth_options.
    zk_auth_file: str | None = None
    # Mutual TLS for the node's port and its own calls to other nodes (None: plaintext).
    tls: TlsConfig | None = None
    # TLS to ZooKeeper's secure port (None: plaintext).
    zk_tls: TlsConfig | None = None
    # The shared cluster secret: only connections that proved it may call the node-only
    # methods, and the node proves it on its own calls to other nodes (None: no secret).
    cluster_secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """The failure detector's timings must nest: a heartbeat renews the lease several
        times before a backup suspects the primary, and suspicion comes before the lease
        ends (else a healthy primary would lose its lease between two heartbeats)."""
        if not 0 < self.heartbeat_interval_s < self.suspect_after_s:
            raise ValueError(
                f"heartbeat interval ({self.heartbeat_interval_s:g} s) must be shorter than "
                f"the suspicion time ({self.suspect_after_s:g} s)"
            )
        if self.lease_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"the lease ({self.lease_s:g} s) must last at least two heartbeat intervals "
                f"({self.heartbeat_interval_s:g} s each)"
            )

    @property
    def address(self) -> str:
        """What the node registers and other nodes and clients dial: ``advertise`` if
        given, else the address it binds."""
        return self.advertise or f"{self.host}:{self.port}"

    @property
    def zk_auth_options(self) -> tuple[str, ...]:
        """The credential options of the kv-createznode commands the node's messages print:
        its --zk-auth-file (absolute: the operator's shell may be in another directory),
        else ``--zk-auth USER:PASSWORD`` for credentials given otherwise (never the
        password), none without credentials."""
        if self.zk_auth_file is not None:
            return ("--zk-auth-file", os.path.abspath(self.zk_auth_file))
        return ("--zk-auth", "USER:PASSWORD") if self.zk_auth is not None else ()


@dataclass(frozen=True, slots=True)
class ClientConfig:
    zk_connect: str
    zk_path: str
    rpc_timeout_ms: int = 2000
    connect_timeout_ms: int = 500
    zk_connect_timeout_s: float = 10.0
    zk_session_timeout_s: float = ZK_SESSION_TIMEOUT_S
    zk_request_timeout_s: float = ZK_REQUEST_TIMEOUT_S
    tls: TlsConfig | None = None  # mutual TLS to the nodes (None: plaintext)
    zk_tls: TlsConfig | None = None  # TLS to ZooKeeper's secure port (None: plaintext)
