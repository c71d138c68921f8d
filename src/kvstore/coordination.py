"""ZooKeeper: membership and cluster metadata. The only module that imports kazoo.

Layout under the parent path P (created by ``kv-createznode``, before any node starts):

- ``P/node-0000000042`` — one ephemeral sequential znode per live node, data
  ``host:port`` (UTF-8). In a steady state the lowest sequence is the primary and
  the next ones the backups (one with the seed's replication factor 2).
- the data of P itself — :class:`ClusterMeta` as JSON: the epoch, the primary,
  the replication factor N (how many copies: the primary and up to N - 1 in-sync
  backups), the *in-sync set* (the nodes holding every acknowledged write) and the address of
  each of them (asked before anyone says DATA LOST: a member whose session expired has
  no znode but may still answer there). It is only ever
  changed by compare-and-set on P's version, so two nodes can never both win a
  change based on the same state. A node takes over as primary only by a CAS
  that bumps the epoch, and only if it is in the in-sync set; a primary drops a
  failed backup from the set (by CAS) before it acknowledges writes without it.
  The metadata also carries the cluster's *incarnation*: a random id written when the
  cluster is created (``kv-createznode``, ``--create-parent``, ``--reset``, or a node that
  starts a new cluster on a parent without one) and kept by every change after. A node
  records it in its data directory and refuses to join a cluster of another incarnation
  with data of its own (server/follower.py). Metadata written by an earlier version has
  none: the first primary of this version adds one (server/node.py).

Nodes never create P on their own: registering under a missing P fails with
NoClusterError (so does reading it once it is gone), and a node stops rather than
re-create it, for a new P holds a new, empty cluster: a mistyped path must not start a
second cluster, nor a deleted one come back empty. The one exception is asked for by
name: ``kv-node --create-parent`` creates P at its first start, exactly as
``kv-createznode`` with the same credentials would (:meth:`Coordinator.create_parent`).

Access control: given digest credentials (``user:password``), every znode kvstore
creates (the parent, member znodes) gets :func:`secure_acl` — ALL for that digest
identity, READ for anyone — so clients still find the primary anonymously but only
holders of the credentials can register, delete members or change the metadata.
Without credentials znodes are world-open, as in the seed; a node with credentials
refuses to join a parent that anyone may write (:meth:`Coordinator.check_parent_acl`).
A child whose name has no 10-digit sequence, that is not ephemeral, or whose data is
not ``host:port``, is never a member.

Every request is bounded by ``request_timeout_s`` (a timeout is a CoordinationError;
for a compare-and-set its outcome is unknown until read back). Reads are cached
and re-read only after a ZooKeeper watch fired, so polling
:meth:`ClusterView.members` / :meth:`ClusterView.meta` is cheap. Watch callbacks
and session listeners only set flags and call ``on_change``; they never block.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
from kazoo.hosts import collect_hosts
from kazoo.protocol.connection import ConnectionHandler
from kazoo.protocol.serialization import Connect
from kazoo.security import ACL, READ_ACL_UNSAFE, Permissions, make_digest_acl

from kvstore import errors
from kvstore.config import (
    ZK_RECONNECT_MAX_DELAY_S,
    ZK_REQUEST_TIMEOUT_S,
    ZK_SESSION_TIMEOUT_S,
    TlsConfig,
)

log = logging.getLogger(__name__)
# kazoo is this package's own business: with no logging configured by the application,
# its warnings ("Connection dropped: ...") would reach stderr through logging's last-resort
# handler. A configured application still gets them (records still propagate to its root).
logging.getLogger("kazoo").addHandler(logging.NullHandler())


class _RepeatsFilter(logging.Filter):
    """Lets the same warning (the same text) through at most once per ``every_s``, saying
    how many it held back: kazoo warns at each reconnect attempt, several times a second
    while ZooKeeper is down, which buries what the program itself says. Other levels,
    warnings with a traceback, and a warning whose text changed (another cause) pass."""

    def __init__(self, every_s: float) -> None:
        super().__init__()
        self._every_s = every_s
        self._seen: dict[str, tuple[float, int]] = {}  # text -> (passed at, held back)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or record.exc_info:
            return True
        try:
            text = record.getMessage()
        except Exception:  # (a record that does not format: logging reports it itself)
            return True
        now = time.monotonic()
        with self._lock:
            passed_at, held = self._seen.get(text, (-self._every_s, 0))
            if now - passed_at < self._every_s:
                self._seen[text] = (passed_at, held + 1)
                return False
            if len(self._seen) > 64:  # (texts vary with addresses: keep it small)
                self._seen.clear()
            self._seen[text] = (now, 0)
        if held:
            record.msg, record.args = f"{text} (and {held} more like it since)", None
        return True


KAZOO_REPEATS_EVERY_S = 30.0
logging.getLogger("kazoo.client").addFilter(_RepeatsFilter(KAZOO_REPEATS_EVERY_S))

MEMBER_PREFIX = "node-"
DEFAULT_REPLICAS = 2  # the seed's: a primary and one backup
MAX_REPLICAS = 9
ZOOKEEPER_OWN = "/zookeeper"  # ZooKeeper's own znodes (quotas, config): no cluster's parent


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    address: str

    @property
    def sequence(self) -> int:
        return _sequence(self.name)


@dataclass(frozen=True, slots=True)
class ClusterMeta:
    """The fenced cluster state kept in the parent znode's data."""

    epoch: int = 0
    primary: str = ""
    primary_address: str = ""
    in_sync: tuple[str, ...] = field(default=())
    # (name, host:port) of in-sync members, sorted by name; only names in ``in_sync``.
    addresses: tuple[tuple[str, str], ...] = field(default=())
    # (name, durable id) of in-sync members with a data directory (the id survives their
    # restarts; member names stay plain node-<sequence>, so that names sort as sequences).
    ids: tuple[tuple[str, str], ...] = field(default=())
    # How many copies the cluster keeps: the primary and up to replicas - 1 backups.
    replicas: int = DEFAULT_REPLICAS
    # (name, certificate identity) of in-sync members serving mutual TLS (rpc.tls: the
    # fingerprint of the certificate each showed): who may replicate and join (SECURITY.md).
    identities: tuple[tuple[str, str], ...] = field(default=())
    # The cluster's incarnation id ("": metadata of an earlier version, or a parent created
    # by one); a new one per kv-createznode, --create-parent and --reset.
    incarnation: str = ""

    def __post_init__(self) -> None:
        kept = sorted((n, a) for n, a in self.addresses if n in self.in_sync)
        object.__setattr__(self, "addresses", tuple(kept))
        object.__setattr__(
            self, "ids", tuple(sorted((n, i) for n, i in self.ids if n in self.in_sync))
        )
        if self.identities:
            kept = sorted((n, i) for n, i in self.identities if n in self.in_sync)
            object.__setattr__(self, "identities", tuple(kept))

    def alone(
        self,
        epoch: int,
        name: str,
        address: str,
        durable: str | None = None,
        identity: str | None = None,
    ) -> ClusterMeta:
        """``name`` at ``address`` primary of ``epoch``, the only member of the in-sync set
        (``durable``: its durable id, if it keeps a data directory; ``identity``: its
        certificate's, under TLS); the replication factor and the incarnation are kept."""
        ids = ((name, durable),) if durable else ()
        identities = ((name, identity),) if identity else ()
        return ClusterMeta(
            epoch,
            name,
            address,
            (name,),
            ((name, address),),
            ids,
            replicas=self.replicas,
            identities=identities,
            incarnation=self.incarnation,
        )

    def durable_members(self) -> dict[str, str]:
        """{durable id: name} of the in-sync members that keep a data directory (names of
        the older form node-<id>-<sequence> included)."""
        found = {i: n for n, i in self.ids}
        for name in self.in_sync:
            old_form = durable_id(name)
            if old_form is not None:
                found.setdefault(old_form, name)
        return found

    @property
    def is_initialized(self) -> bool:
        return self.epoch > 0

    @property
    def is_kvstore(self) -> bool:
        """Whether this is a kvstore cluster's metadata: a primary was named, or the parent
        was created (or reset) by kv-createznode or --create-parent, which give it an
        incarnation id. False for a seed cluster's parent (no metadata)."""
        return self.is_initialized or bool(self.incarnation)

    def address_of(self, name: str) -> str | None:
        """Where the in-sync member ``name`` served when it was listed (None: not recorded)."""
        return dict(self.addresses).get(name)

    def identity_of(self, name: str) -> str | None:
        """The certificate identity the in-sync member ``name`` was listed with (None: not
        recorded: no TLS, or metadata written before identities were)."""
        return dict(self.identities).get(name)

    def to_bytes(self) -> bytes:
        raw: dict[str, Any] = {
            "epoch": self.epoch,
            "primary": self.primary,
            "primary_address": self.primary_address,
            "in_sync": list(self.in_sync),
            "addresses": dict(self.addresses),
            "ids": dict(self.ids),
            "replicas": self.replicas,
        }
        if self.identities:  # only under TLS: plaintext metadata stays as it was
            raw["identities"] = dict(self.identities)
        if self.incarnation:
            raw["incarnation"] = self.incarnation
        return json.dumps(raw, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> ClusterMeta:
        if not data:
            return cls()
        try:
            raw = json.loads(data)
            return cls(
                epoch=int(raw["epoch"]),
                primary=str(raw["primary"]),
                primary_address=str(raw["primary_address"]),
                in_sync=tuple(raw["in_sync"]),
                addresses=tuple((str(n), str(a)) for n, a in raw.get("addresses", {}).items()),
                ids=tuple((str(n), str(i)) for n, i in raw.get("ids", {}).items()),
                replicas=_readable_replicas(raw.get("replicas", DEFAULT_REPLICAS)),
                identities=tuple((str(n), str(i)) for n, i in raw.get("identities", {}).items()),
                incarnation=str(raw.get("incarnation", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise errors.CoordinationError(
                f"parent znode holds no kvstore metadata: {exc}"
            ) from None

    def with_in_sync(
        self,
        names: tuple[str, ...],
        addresses: dict[str, str] | None = None,
        ids: dict[str, str | None] | None = None,  # None: no data directory
        identities: dict[str, str | None] | None = None,  # None: no TLS
    ) -> ClusterMeta:
        known = {**dict(self.addresses), **(addresses or {})}
        known_ids = {**dict(self.ids), **{n: i for n, i in (ids or {}).items() if i}}
        given = {n: i for n, i in (identities or {}).items() if i}
        known_identities = {**dict(self.identities), **given}
        return replace(
            self,
            in_sync=names,
            addresses=tuple(known.items()),
            ids=tuple(known_ids.items()),
            identities=tuple(known_identities.items()),
        )

    def without_in_sync(self, *names: str) -> ClusterMeta:
        return replace(self, in_sync=tuple(n for n in self.in_sync if n not in names))

    def renamed(self, old: str, new: str) -> ClusterMeta:
        """``old`` renamed ``new`` in the in-sync set (and as primary)."""
        return replace(
            self,
            primary=new if self.primary == old else self.primary,
            in_sync=tuple(new if n == old else n for n in self.in_sync),
            addresses=tuple((new if n == old else n, a) for n, a in self.addresses),
            ids=tuple((new if n == old else n, i) for n, i in self.ids),
            identities=tuple((new if n == old else n, i) for n, i in self.identities),
        )


def is_member(status: Any, name: str, incarnation: str) -> bool:
    """Whether the node that answered with ``status`` is member ``name`` of the cluster
    incarnation ``incarnation``. Names are unique only under one parent znode: another
    cluster's first node is node-0000000000 too (see serves_incarnation)."""
    return status.node_id == name and serves_incarnation(status, incarnation)


def serves_incarnation(status: Any, incarnation: str) -> bool:
    """Whether the node that answered with ``status`` may serve cluster ``incarnation``: not
    if it says it serves another ("" on either side, or a node holding no copy, which
    reports none: unknown, not told apart)."""
    return not (incarnation and status.incarnation and status.incarnation != incarnation)


def new_incarnation() -> str:
    """A fresh cluster incarnation id (random)."""
    return uuid.uuid4().hex[:16]


def durable_id(name: str) -> str | None:
    """The stable id in a member name ``node-<id>-<sequence>`` (how nodes with a data
    directory registered before the id moved into the metadata), or None for a plain
    ``node-<sequence>``."""
    if not name.startswith(MEMBER_PREFIX) or _sequence(name) < 0:
        return None
    middle = name[len(MEMBER_PREFIX) : -10]
    return middle[:-1] if len(middle) > 1 and middle.endswith("-") else None


def designated_backups(members: list[Member], primary: str, replicas: int) -> list[Member]:
    """The nodes that should be the backups: the ``replicas - 1`` lowest members other than
    the primary (the others wait as standbys)."""
    return [m for m in members if m.name != primary][: max(0, replicas - 1)]


def _readable_replicas(stored: Any) -> int:
    """The stored replication factor, brought into 1..MAX_REPLICAS (with a warning) rather
    than refused: a value out of range must not make the cluster unreachable."""
    if not isinstance(stored, int) or isinstance(stored, bool):
        log.warning("stored replication factor %r is no number; using %d", stored, DEFAULT_REPLICAS)
        return DEFAULT_REPLICAS
    usable = min(max(stored, 1), MAX_REPLICAS)
    if usable != stored:
        log.warning("stored replication factor %d is out of range; using %d", stored, usable)
    return usable


def check_replicas(replicas: int) -> int:
    """``replicas`` if it is a replication factor kvstore supports, else ValueError."""
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"the replication factor must be 1 to {MAX_REPLICAS}, not {replicas}")
    return replicas


def split_auth(auth: str) -> tuple[str, str]:
    """``user:password`` -> (user, password); the password may contain ':'."""
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise errors.CoordinationError("ZooKeeper credentials must be USER:PASSWORD")
    return user, password


def secure_acl(auth: str) -> list[ACL]:
    """ALL for the digest identity of ``auth``, READ for anyone."""
    user, password = split_auth(auth)
    return [make_digest_acl(user, password, all=True), *READ_ACL_UNSAFE]


# ACL schemes that grant to whoever connects, without credentials: world:anyone, and ip
# (any session from a matching address; ip:0.0.0.0/0 is everyone, like world:anyone).
_OPEN_SCHEMES = frozenset({"world", "ip"})


def _is_world_writable(acls: list[ACL]) -> bool:
    """Whether a session without credentials may do more than read (world:anyone, or an
    ip:ADDRESS entry, beyond READ)."""
    return any(acl.id.scheme in _OPEN_SCHEMES and acl.perms & ~Permissions.READ for acl in acls)


def is_address(text: str) -> bool:
    """Whether a member's data looks like ``host:port`` (port 1..65535, no spaces)."""
    host, sep, port = text.rpartition(":")
    return (
        bool(sep and host and port.isdigit())
        and 0 < int(port) < 65536
        and not any(c.isspace() for c in text)
    )


@contextmanager
def zookeeper_errors(what: str) -> Iterator[None]:
    """Map kazoo's exceptions to CoordinationError: kazoo types stay inside this module."""
    try:
        yield
    except NoAuthError:
        raise errors.CoordinationError(
            f"ZooKeeper {what} refused: not authorized (NoAuth). These znodes are writable "
            "only with the cluster's credentials (--zk-auth-file FILE, --zk-auth USER:PASSWORD "
            "or $KV_ZK_AUTH); none or wrong ones were given"
        ) from None
    except (KazooException, KazooTimeoutError) as exc:
        failure = errors.CoordinationError(f"ZooKeeper {what} failed: {_plain(exc)}")
        failure.is_transient = isinstance(exc, _TRANSIENT)
        raise failure from None


# Failures of the connection or session, not answers: trying again may work.
_TRANSIENT = (ConnectionLoss, SessionExpiredError, KazooTimeoutError, ConnectionClosedError)


def _plain(exc: Exception) -> str:
    """kazoo's failure in words for a log line (its repr is for programmers)."""
    if isinstance(exc, KazooTimeoutError):
        return "no answer in time (is ZooKeeper down or unreachable?)"
    if isinstance(exc, ConnectionLoss):
        return "the connection to ZooKeeper was lost"
    if isinstance(exc, SessionExpiredError):
        return "the ZooKeeper session expired"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


CANCEL_CHECK_S = 0.1  # how often a connect asks whether it is cancelled


def _attempt_s(session_s: float) -> float:
    """How long one attempt to reach a ZooKeeper server may take (its TCP and TLS connect,
    then its session handshake): a third of the session timeout, at least 1 s."""
    return max(1.0, session_s / 3)


def _bound_each_connection_attempt() -> None:
    """kazoo gives each attempt to reach a server the whole session timeout for its connect
    and, divided by the number of hosts, for its session handshake (10 s each with one
    server), and has no option for either. An attempt that connected while ZooKeeper
    restarted and got no handshake reply then held a node's reconnect until its session
    expired (RELIABILITY.md); a host of an ensemble that drops packets would do the same
    with the connect. A server that is up answers both in milliseconds. Each now waits
    :func:`_attempt_s` (at most kazoo's own wait), so the next attempt (the reconnect
    retry, within a second) still comes in time to keep the session. Another kazoo without
    these methods is left as it is."""
    invoke = getattr(ConnectionHandler, "_invoke", None)
    create = getattr(SequentialThreadingHandler, "create_connection", None)
    if invoke is None or create is None or getattr(invoke, "is_bounded", False):
        return

    def bounded_invoke(self: Any, timeout: float, request: Any, xid: Any = None) -> Any:
        if isinstance(request, Connect):
            timeout = min(timeout, _attempt_s(self.client._session_timeout / 1000.0))
        return invoke(self, timeout, request, xid)

    def bounded_create(self: Any, *args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.get("timeout")  # (kazoo passes the session timeout)
        if timeout is not None:
            kwargs["timeout"] = min(timeout, _attempt_s(timeout))
        return create(self, *args, **kwargs)

    bounded_invoke.is_bounded = True  # type: ignore[attr-defined]
    ConnectionHandler._invoke = bounded_invoke
    SequentialThreadingHandler.create_connection = bounded_create


_bound_each_connection_attempt()


def connect(
    zk_connect: str,
    session_timeout_s: float,
    connect_timeout_s: float,
    auth: str | None = None,
    tls: TlsConfig | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> KazooClient:
    """A started session. With ``auth`` (``user:password``) it authenticates by digest and
    every znode it creates gets :func:`secure_acl`. With ``tls`` it connects to ZooKeeper's
    secure port: this side's certificate, the server's checked against the CA and its
    host name against the connect string. ``is_cancelled`` (asked a few times a second while
    it waits): give up early, raising CoordinationError (say, a node asked to stop)."""
    # Reconnect at least once a second: kazoo's default backoff doubles up to 60 s, which
    # would keep a node or client away for long after a short ZooKeeper outage.
    retry = {"max_tries": -1, "delay": 0.1, "max_delay": ZK_RECONNECT_MAX_DELAY_S}
    secure: dict[str, Any] = {}
    if auth is not None:
        secure = {"auth_data": [("digest", auth)], "default_acl": secure_acl(auth)}
    if tls is not None:
        secure.update(
            use_ssl=True,
            ca=tls.ca_path,
            certfile=tls.cert_path,
            keyfile=tls.key_path,
            verify_certs=True,
            check_hostname=True,
        )
    try:
        check_connect_string(zk_connect)
    except ValueError as exc:
        raise errors.BadRequestError(
            f"not a ZooKeeper connect string (host:port,...): {zk_connect!r}: {exc}"
        ) from None
    kazoo_log = _MutableLog(logging.getLogger("kazoo.client"))
    zk = KazooClient(
        hosts=zk_connect,
        timeout=session_timeout_s,
        connection_retry=retry,
        logger=kazoo_log,
        **secure,
    )
    connected = zk.start_async()  # (what zk.start does, waiting in slices to hear a cancel)
    deadline = time.monotonic() + connect_timeout_s
    while not connected.wait(min(CANCEL_CHECK_S, max(0.0, deadline - time.monotonic()))):
        if is_cancelled is not None and is_cancelled():
            # (stop joins kazoo's connection thread, which may sit in a connect to a
            # silent server for a session timeout: the caller need not wait for that)
            threading.Thread(target=_close_quietly, args=(zk,), daemon=True).start()
            raise errors.CoordinationError("gave up connecting to ZooKeeper: cancelled")
        if time.monotonic() >= deadline:  # (closed meanwhile, as above: the time is up)
            threading.Thread(target=_close_quietly, args=(zk,), daemon=True).start()
            over = " over TLS" if tls is not None else ""
            why = _why_unreached(kazoo_log.last_problem, tls is not None)
            raise errors.CoordinationError(
                f"cannot reach ZooKeeper at {zk_connect}{over} within {connect_timeout_s:g} s{why}"
            )
    return zk


def _close_quietly(zk: KazooClient) -> None:
    """Close a client given up on, on a thread of its own (the caller goes on, and its
    process may exit meanwhile): muted, since a daemon thread writing to stderr while the
    interpreter exits can abort it."""
    if isinstance(zk.logger, _MutableLog):
        zk.logger.is_muted = True
    with contextlib.suppress(Exception):
        zk.stop()
        zk.close()


class _MutableLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A kazoo client's logger (its connection thread logs through it) that can be muted,
    and keeps its last warning: why the last connection attempt failed, if it said."""

    is_muted = False
    last_problem = ""

    def isEnabledFor(self, level: int) -> bool:
        return not self.is_muted and self.logger.isEnabledFor(level)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.WARNING:
            try:
                self.last_problem = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                self.last_problem = str(msg)
        super().log(level, msg, *args, **kwargs)


def _why_unreached(problem: str, is_tls: bool) -> str:
    """What to add to "cannot reach ZooKeeper": kazoo's last reason, and a hint where the
    reason is the one a TLS-only port gives a plaintext client (it closes the connection)."""
    if not problem:
        return " (no answer: nothing reached it, or it did not reply)"
    reason = problem.removeprefix("Connection dropped: ")
    hint = ""
    if not is_tls and "connection broken" in reason:
        hint = (
            " (what listens there ended the connection: is it ZooKeeper's port, not a "
            "kvstore node's? A ZooKeeper port that serves TLS only does so too: then give "
            "the --zk-tls-ca/--zk-tls-cert/--zk-tls-key options)"
        )
    return f": {reason}{hint}"


def createznode_command(
    zk_connect: str,
    path: str,
    auth_options: Sequence[str] = (),
    tls: TlsConfig | None = None,
    *,
    reset: bool = False,
) -> str:
    """The kv-createznode command line (quoted for a shell) that a node's message tells the
    operator to run, with the node's credential options (never a password: say
    ``--zk-auth USER:PASSWORD``) and ZooKeeper TLS files (absolute paths: the operator's
    shell may be in another directory than the node)."""
    command = ["kv-createznode", *(["--reset"] if reset else []), *auth_options]
    if tls is not None:
        cert, key, ca = map(os.path.abspath, (tls.cert_path, tls.key_path, tls.ca_path))
        command += ["--zk-tls-cert", cert, "--zk-tls-key", key, "--zk-tls-ca", ca]
    return shlex.join([*command, zk_connect, path])


def check_connect_string(zk_connect: str) -> None:
    """Raise ValueError unless ``zk_connect`` reads as a ZooKeeper connect string
    (``host:port,...``, optionally ``/chroot``), as kazoo reads it. Whitespace is no part
    of a host name (kazoo would try to resolve "bad host" until the connect deadline)."""
    hosts, _ = collect_hosts(zk_connect)
    for host, _port in hosts:
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"not a host name: {host!r}")


def create_parent(
    zk_connect: str,
    path: str,
    reset: bool = False,
    timeout_s: float = 10.0,
    auth: str | None = None,
    secure_existing: bool = False,
    tls: TlsConfig | None = None,
    replicas: int | None = None,
    force: bool = False,
    is_running: Callable[[str], bool] | None = None,
) -> str:
    """Create ``path`` (and its parents; with ``auth``, with :func:`secure_acl`). With
    ``reset``, clear its cluster metadata (the replication factor is kept; a new incarnation
    id: a new cluster); refused while nodes are registered under it, unless ``force`` (only
    those ``is_running(address)`` says run count, if given). A new parent gets an
    incarnation id too. With ``secure_existing`` (needs ``auth``), give an existing parent
    and its members the secure ACL (refused as a reset is, without ``force``). With
    ``replicas``, set the replication factor (by compare-and-set: a serving primary
    adapts). Returns what was done."""
    if secure_existing and auth is None:
        raise errors.CoordinationError("securing an existing parent needs credentials")
    if replicas is not None:
        check_replicas(replicas)
    check_cluster_parent(path, b"", 0)  # (before anything is created: not ZooKeeper's own)
    zk = connect(zk_connect, ZK_SESSION_TIMEOUT_S, timeout_s, auth, tls)
    try:
        with zookeeper_errors(f"creating {path}"):
            created = ClusterMeta(replicas=replicas or DEFAULT_REPLICAS)
            initial = replace(created, incarnation=new_incarnation()).to_bytes()
            if _create_parent_znode(zk, path, initial, timeout_s):
                done = ["created" + (" (secure ACL)" if auth else "")]
                if replicas is not None:
                    done.append(f"replication factor {replicas}")
                return ", ".join(done)
        with zookeeper_errors(f"changing the existing {path}"):  # (not "creating": it exists)
            data, stat = zk.get(path)
            # (reset: what it holds is replaced, but never ZooKeeper's or a node's znode)
            check_cluster_parent(path, b"" if reset else data, stat.ephemeralOwner)
            done = ["exists"]
            if secure_existing:
                assert auth is not None
                done.append(_secure_existing(zk, path, auth, is_running))
            elif auth is not None and _is_world_writable(zk.get_acls(path)[0]):
                done.append("but writable by anyone (--secure-existing tightens it)")
            if reset and not force:
                _refuse_reset_under_nodes(zk, path, is_running)
            if reset or replicas is not None:
                done.append(_set_meta(zk, path, reset, replicas))
            if reset:
                done[0] = "reset"  # as kv-createznode --reset always said
            return ", ".join(d for d in done if d)
    finally:
        zk.stop()
        zk.close()


def check_cluster_parent(path: str, data: bytes, ephemeral_owner: int) -> None:
    """NotAClusterError unless the existing znode ``path`` (holding ``data``) can be a
    cluster's parent: empty (a new one, or the seed's) or holding kvstore metadata, not
    ephemeral (a node's registration: it can have no children), not ZooKeeper's own."""
    if path == ZOOKEEPER_OWN or path.startswith(ZOOKEEPER_OWN + "/"):
        raise errors.NotAClusterError(
            f"{path} belongs to ZooKeeper itself: choose another path, such as /kvstore"
        )
    if ephemeral_owner:
        raise errors.NotAClusterError(
            f"{path} is an ephemeral znode (a node's registration?), not a cluster's parent: "
            "give the parent path, such as /kvstore"
        )
    try:
        ClusterMeta.from_bytes(data)
    except errors.CoordinationError:
        raise errors.NotAClusterError(
            f"{path} holds data that is not a kvstore cluster's metadata ({len(data)} bytes, "
            f"starting {data[:20]!r}): choose another path, or make it a new cluster's "
            "parent with kv-createznode --reset"
        ) from None


def _create_parent_znode(zk: KazooClient, path: str, initial: bytes, timeout_s: float) -> bool:
    """Create the parent ``path`` holding ``initial``, and its missing ancestors, each with
    the session's default ACL (:func:`secure_acl` if it has credentials, else world-open):
    what kv-createznode does, and kv-node --create-parent through the same code. False if
    ``path`` existed (it is left as it is)."""
    try:
        zk.create_async(path, initial, makepath=True).get(timeout=timeout_s)
    except NodeExistsError:
        return False
    return True


def _set_meta(zk: KazooClient, path: str, reset: bool, replicas: int | None) -> str:
    """Clear the metadata (``reset``; the replication factor stays, the incarnation is new)
    and/or set the replication factor, by compare-and-set on the parent's version (a few
    tries)."""
    for _ in range(5):
        data, stat = zk.get(path)
        try:
            meta = ClusterMeta.from_bytes(data)
        except errors.CoordinationError:
            if not reset:  # never replace what we cannot read but --reset was not asked for
                raise
            meta = ClusterMeta()  # not ours (say, a seed cluster's parent): replaced
        wanted = (
            ClusterMeta(replicas=meta.replicas, incarnation=new_incarnation()) if reset else meta
        )
        if replicas is not None:
            wanted = replace(wanted, replicas=replicas)
        new = b"" if wanted == ClusterMeta() else wanted.to_bytes()  # as a new parent has
        if data in (new, wanted.to_bytes()):
            return "" if replicas is None else f"replication factor {meta.replicas}"
        try:
            zk.set(path, new, version=stat.version)
        except BadVersionError:
            continue
        return "" if replicas is None else f"replication factor {replicas} (was {meta.replicas})"
    raise errors.CoordinationError(f"the metadata of {path} kept changing; try again")


def _refuse_reset_under_nodes(
    zk: KazooClient, path: str, is_running: Callable[[str], bool] | None
) -> None:
    """A reset under running nodes would discard the store they serve (an in-memory one
    for good): refused, unless forced, while a registered node runs (``_running_members``;
    after DATA LOST the nodes have stopped already)."""
    running = _running_members(zk, path, is_running)
    if running:
        raise errors.CoordinationError(
            f"refusing to reset {path}: {len(running)} registered node(s) answer at their "
            f"address ({', '.join(running)}), so the cluster may be serving: a reset would "
            "make it a new, EMPTY cluster (in-memory nodes lose their data for good). Stop "
            "every node first, or add --force if that is what you want"
        )


def _running_members(
    zk: KazooClient, path: str, is_running: Callable[[str], bool] | None
) -> list[str]:
    """ "NAME at ADDRESS" of each node registered under ``path`` (a live member znode) that
    ``is_running(ADDRESS)`` says runs (None: each registered one). A node killed a moment
    ago keeps its znode until its ZooKeeper session expires: only a check at its address
    tells."""
    running = []
    for name in sorted(zk.get_children(path)):
        if not name.startswith(MEMBER_PREFIX):
            continue
        with contextlib.suppress(NoNodeError):
            data, stat = zk.get(f"{path}/{name}")
            address = data.decode(errors="replace")
            if stat.ephemeralOwner and (is_running is None or is_running(address)):
                running.append(f"{name} at {address}")
    return running


def _secure_existing(
    zk: KazooClient, path: str, auth: str, is_running: Callable[[str], bool] | None
) -> str:
    """Set the secure ACL on ``path`` and on each of its children. Refused while nodes run
    (see ``_running_members``): they have no credentials (a node with credentials refuses an
    open parent), so the ACL would leave them unable to change the cluster state (no
    failover, no join)."""
    members = _running_members(zk, path, is_running)
    if members:
        raise errors.CoordinationError(
            f"refusing to secure {path}: {len(members)} registered node(s) answer at their "
            f"address ({', '.join(members)}); they have no credentials and could no longer "
            "fail over or join. Stop every node, secure the parent, then start the nodes with "
            "the credentials (an in-memory cluster loses its data that way: SECURITY.md)"
        )
    acl = secure_acl(auth)
    zk.set_acls(path, acl)
    secured = 0
    for name in zk.get_children(path):
        with contextlib.suppress(NoNodeError):
            zk.set_acls(f"{path}/{name}", acl)
            secured += 1
    return f"secured (ACL: {describe_acl(acl)}; and {secured} member znodes)"


def describe_acl(acls: list[ACL]) -> str:
    """A short human form, e.g. ``digest:kv:...=ALL, world:anyone=READ``."""
    names = {
        Permissions.READ: "READ",
        Permissions.WRITE: "WRITE",
        Permissions.CREATE: "CREATE",
        Permissions.DELETE: "DELETE",
        Permissions.ADMIN: "ADMIN",
    }
    parts = []
    for acl in acls:
        perms = (
            "ALL"
            if acl.perms == Permissions.ALL
            else "|".join(name for bit, name in names.items() if acl.perms & bit)
        )
        ident = acl.id.id.split(":", 1)[0] + ":..." if acl.id.scheme == "digest" else acl.id.id
        parts.append(f"{acl.id.scheme}:{ident}={perms or 'NONE'}")
    return ", ".join(parts)


class ClusterView:
    """Cached, watch-driven view of the members and the metadata under one parent path."""

    def __init__(
        self,
        zk: KazooClient,
        path: str,
        on_change: Callable[[], None],
        request_timeout_s: float = ZK_REQUEST_TIMEOUT_S,
    ) -> None:
        self.zk = zk
        self.path = path.rstrip("/") or "/"
        self._on_change = on_change
        self._lock = threading.Lock()
        self._members_dirty = True
        self._members: list[Member] = []
        self._lowest_child_dirty = True
        self._lowest_child_address = ""
        self._addresses: dict[str, str] = {}
        self._ignored: set[str] = set()  # children whose data is not host:port (logged once)
        self._meta_state: tuple[ClusterMeta, int] = (ClusterMeta(), -1)
        # The cached metadata is fresh while _meta_seen == _meta_wanted; a watch or a
        # refresh bumps _meta_wanted, a completed read sets _meta_seen to what it served.
        self._meta_wanted = 1
        self._meta_seen = 0
        self.is_session_lost = False
        self.is_connected = True
        self.request_timeout_s = request_timeout_s
        zk.add_listener(self._on_state)

    # Called from kazoo's threads: set flags, never block.
    def _on_state(self, state: str) -> None:
        if state == KazooState.LOST:
            self.is_session_lost = True
        self.is_connected = state == KazooState.CONNECTED
        self._members_dirty = True
        self._lowest_child_dirty = True
        self._meta_wanted += 1
        self._on_change()

    def _on_members_event(self, _event: Any) -> None:
        self._members_dirty = True
        self._lowest_child_dirty = True
        self._on_change()

    def _on_meta_event(self, _event: Any) -> None:
        self._meta_wanted += 1
        self._on_change()

    def members(self) -> list[Member]:
        """Live members in sequence order (lowest first)."""
        with self._lock:
            if self._members_dirty:
                self._members = self._reread("_members_dirty", self._read_members, "members")
            return list(self._members)

    def lowest_child_address(self) -> str:
        """The seed's rule, for a parent without kvstore metadata: the child znode with the
        lowest sequence number (whatever its prefix) is the primary, and its data is its
        host:port. "" if there is no such child."""
        with self._lock:
            if self._lowest_child_dirty:
                children = self._reread(
                    "_lowest_child_dirty", lambda: self._read_members(prefix=""), "children"
                )
                self._lowest_child_address = children[0].address if children else ""
            return self._lowest_child_address

    def _reread(self, dirty_flag: str, read: Callable[[], list[Member]], what: str) -> list[Member]:
        """Read again what a watch marked dirty. The flag is cleared first, so a watch that
        fires during the read is not lost; a failed read leaves it set."""
        setattr(self, dirty_flag, False)
        try:
            with zookeeper_errors(f"reading {what}"):
                return read()
        except Exception:
            setattr(self, dirty_flag, True)
            raise

    def _read_members(self, prefix: str = MEMBER_PREFIX) -> list[Member]:
        """Children named ``prefix`` + sequence number, lowest first, with their data;
        a child whose data is not ``host:port`` is ignored (and logged once)."""
        children = self._children(watch=self._on_members_event)
        self._ignored &= set(children)
        names = sorted(
            (n for n in children if n.startswith(prefix) and _sequence(n) >= 0), key=_sequence
        )
        addresses: dict[str, str] = {}
        for name in names:
            address = self._addresses.get(name)
            if address is None and name not in self._ignored:
                address = self._read_address(name)
            if address is not None:
                addresses[name] = address
        self._addresses = addresses
        return [Member(n, addresses[n]) for n in names if n in addresses]

    def _read_address(self, name: str) -> str | None:
        """A child's ``host:port``; None if it is gone, is not ephemeral (a member lives
        only as long as its node's session) or its data is something else."""
        try:
            data, stat = self._wait(self.zk.get_async(f"{self.path}/{name}"))
        except NoNodeError:
            return None
        address = str(data.decode("utf-8", "replace"))
        if not stat.ephemeralOwner:
            why = "it is not ephemeral (no node's session owns it)"
        elif not is_address(address):
            why = f"its data {address[:80]!r} is not host:port"
        else:
            return address
        self._ignored.add(name)
        log.warning("ignoring %s/%s: %s", self.path, name, why)
        return None

    def exists(self) -> bool:
        """Whether the parent path exists."""
        with zookeeper_errors("checking the parent path"):
            return self._wait(self.zk.exists_async(self.path)) is not None

    def parent_acl(self) -> tuple[bool, str]:
        """Whether anyone may change the parent znode (more than READ for world:anyone),
        and its ACL in a short human form."""
        with zookeeper_errors("reading the parent's ACL"):
            acls, _ = self._wait(self.zk.get_acls_async(self.path))
        return _is_world_writable(acls), describe_acl(acls)

    def meta(self) -> tuple[ClusterMeta, int]:
        """The metadata and the parent znode's version (for compare-and-set)."""
        if self._meta_seen == self._meta_wanted:  # hot path of every client request: no lock
            return self._meta_state
        with self._lock:
            wanted = self._meta_wanted
            if self._meta_seen != wanted:
                with zookeeper_errors("reading metadata"):
                    try:
                        data, stat = self._wait(
                            self.zk.get_async(self.path, watch=self._on_meta_event)
                        )
                    except NoNodeError:
                        raise self._no_cluster() from None
                self._meta_state = (ClusterMeta.from_bytes(data), stat.version)
                self._meta_seen = wanted
            return self._meta_state

    def _children(self, watch: Callable[[Any], None] | None = None) -> list[str]:
        """The parent's children (NoClusterError if the parent does not exist)."""
        try:
            return list(self._wait(self.zk.get_children_async(self.path, watch=watch)))
        except NoNodeError:
            raise self._no_cluster() from None

    def _no_cluster(self) -> errors.NoClusterError:
        return errors.NoClusterError(
            f"{self.path} does not exist in ZooKeeper {self.connect_string()}"
        )

    def connect_string(self) -> str:
        """The ZooKeeper connect string this view's session uses (hosts and chroot)."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.zk.hosts)
        return hosts + (self.zk.chroot or "")

    def _wait(self, result: Any) -> Any:
        """Every ZooKeeper request is bounded: kazoo would queue it until reconnected."""
        return result.get(timeout=self.request_timeout_s)

    def refresh(self) -> None:
        """Forget the cache: the next read goes to ZooKeeper."""
        self._members_dirty = True
        self._lowest_child_dirty = True
        self._meta_wanted += 1

    def sync(self) -> None:
        """Catch up with the ZooKeeper leader, then forget the cache (for must-be-fresh reads)."""
        with zookeeper_errors("sync"):
            self._wait(self.zk.sync_async(self.path))
        self.refresh()


class Coordinator(ClusterView):
    """A node's handle on ZooKeeper: registration plus compare-and-set of the metadata."""

    def __init__(
        self,
        zk: KazooClient,
        path: str,
        on_change: Callable[[], None],
        request_timeout_s: float = ZK_REQUEST_TIMEOUT_S,
    ) -> None:
        super().__init__(zk, path, on_change, request_timeout_s)
        self.name = ""
        # Plain node-<sequence> for every node: the seed's clients sort the children by
        # name. A node's durable id goes into the metadata instead (ClusterMeta.ids).
        self.member_prefix = MEMBER_PREFIX
        self._may_have_registered = False  # a create failed without saying whether it landed

    def register(self, address: str) -> str:
        """Create this node's ephemeral sequential znode; safe to retry after an unclear failure.
        NoClusterError if the parent does not exist: it is never created here (see the
        module's docstring), and ZooKeeper's own check makes this one race-free."""
        if self._may_have_registered:
            # The last attempt could not tell (nor find out) whether its create landed:
            # look first, or a retry would leave a second znode at our address.
            own = self._own_member(address)
            if own is not None:
                return self._registered(own)
        try:
            with zookeeper_errors(f"registration under {self.path}"):
                try:
                    created = self._wait(
                        self.zk.create_async(
                            f"{self.path}/{self.member_prefix}",
                            address.encode(),
                            ephemeral=True,
                            sequence=True,
                        )
                    )
                except NoNodeError:  # a definite answer: nothing was created
                    raise self._no_cluster() from None
        except errors.NoClusterError:
            raise
        except errors.CoordinationError:
            # The create may have succeeded with its reply lost: adopt such a znode, never
            # leave a second one behind (it would pose as another member at our address).
            self._may_have_registered = True
            own = self._own_member(address)
            if own is None:
                raise
            return self._registered(own)
        return self._registered(created.rsplit("/", 1)[-1])

    def create_parent(self) -> bool:
        """Create the parent (``kv-node --create-parent``) as kv-createznode does with this
        session's credentials (:func:`_create_parent_znode`); False if it existed."""
        initial = ClusterMeta(incarnation=new_incarnation()).to_bytes()
        with zookeeper_errors(f"creating {self.path}"):
            return _create_parent_znode(self.zk, self.path, initial, self.request_timeout_s)

    def require_parent(self) -> None:
        """NoClusterError unless the parent exists, read after catching up with the
        ZooKeeper leader (a server that lags may not have applied its creation yet);
        NotAClusterError if it is no cluster's parent (:func:`check_cluster_parent`)."""
        check_cluster_parent(self.path, b"", 0)  # (not ZooKeeper's own, whether it exists)
        self.sync()
        with zookeeper_errors("reading the parent path"):
            try:
                data, stat = self._wait(self.zk.get_async(self.path))
            except NoNodeError:
                raise self._no_cluster() from None
        check_cluster_parent(self.path, data, stat.ephemeralOwner)

    def _registered(self, name: str) -> str:
        self._may_have_registered = False
        self.name = name
        self.refresh()
        return name

    def _own_member(self, address: str) -> str | None:
        """Our session's znode at ``address``, if any (after catching up with the leader: a
        server we reconnected to may not have applied our create yet)."""
        self.sync()
        session_id = self.zk.client_id[0] if self.zk.client_id else None
        with zookeeper_errors("looking for our own znode"):
            for name in self._children():
                try:
                    data, stat = self._wait(self.zk.get_async(f"{self.path}/{name}"))
                except NoNodeError:
                    continue
                if data == address.encode() and stat.ephemeralOwner == session_id:
                    return str(name)
        return None

    def check_parent_acl(
        self, has_auth: bool, auth_options: Sequence[str] = (), tls: TlsConfig | None = None
    ) -> None:
        """Before registering: without credentials, warn that anyone may change this
        cluster's ZooKeeper state, or raise CoordinationError if the parent is secured (only
        credentials may register under it: say so, rather than warn of the opposite before
        NoAuth). With credentials, raise CoordinationError if the parent exists and lets
        anyone write: that voids the protection the credentials give (``auth_options``,
        ``tls``: the node's, for the command that message prints)."""
        if not has_auth:
            if self.exists() and not self.parent_acl()[0]:
                raise errors.CoordinationError(
                    f"{self.path} is writable only with the cluster's ZooKeeper credentials "
                    "(its ACL), and this node has none: start it with --zk-auth-file FILE "
                    "(or --zk-auth USER:PASSWORD, or $KV_ZK_AUTH)"
                )
            log.warning(
                "no ZooKeeper credentials (--zk-auth): the cluster's state under %s is "
                "writable by anyone who can reach ZooKeeper (they can depose the primary)",
                self.path,
            )
            return
        if not self.exists():
            return  # register refuses (NoClusterError)
        is_open, acl = self.parent_acl()
        if is_open:
            options = [*auth_options, "--secure-existing"]
            command = createznode_command(self.connect_string(), self.path, options, tls)
            raise errors.CoordinationError(
                f"refusing to start: {self.path} is writable by anyone (ACL: {acl}), which "
                f"voids this node's ZooKeeper credentials; secure it first: {command}"
            )

    def is_usable(self) -> bool:
        """Connected, with a session: requests can go through now."""
        return self.is_connected and self.zk.connected

    def compare_and_set(self, meta: ClusterMeta, version: int) -> bool:
        """Write ``meta`` if the parent is still at ``version``. False if someone changed it."""
        with zookeeper_errors("compare-and-set of the metadata"):
            try:
                self._wait(self.zk.set_async(self.path, meta.to_bytes(), version=version))
            except BadVersionError:
                self.refresh()
                return False
        self.refresh()
        return True

    def remove_member(self, name: str) -> None:
        """Delete another node's znode (after proving it dead or fencing it out)."""
        with zookeeper_errors("delete"), contextlib.suppress(NoNodeError):
            self._wait(self.zk.delete_async(f"{self.path}/{name}"))
        self.refresh()

    def close(self) -> None:
        try:
            self.zk.stop()
            self.zk.close()
        except KazooException:
            log.debug("error while closing the ZooKeeper session", exc_info=True)


def _sequence(name: str) -> int:
    """The sequence number ZooKeeper appended to a sequential znode's name (its last 10
    digits), or -1 if the name has none."""
    digits = name[-10:]
    return int(digits) if len(digits) == 10 and digits.isdigit() else -1
