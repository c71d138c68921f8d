"""The Thrift service of a storage node: validates arguments and delegates to the node.

The handler knows the node only through :class:`NodeService`, the calls it makes;
StorageNode implements it (the node builds the handler, never the other way round).
Every refusal is a KVError (sent as a TApplicationException with its code, see rpc.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from kvstore import errors
from kvstore.config import Limits
from kvstore.idl import Lookup
from kvstore.server.sessions import RequestRecord
from kvstore.server.storage import FlatRecords
from kvstore.server.wal import Marker

# Under mutual TLS only a node's certificate may call these, and with a cluster secret only a
# connection that proved it (rpc refuses the others with FORBIDDEN before the handler runs):
# replication and state transfer.
NODE_ONLY_METHODS = frozenset(
    {
        "replicate",
        "replicate_batch",
        "join",
        "sync_fetch",
        "sync_log",
        "join_done",
        "backup_renamed",
    }
)

MAX_CLIENT_ID_BYTES = 128


class Write(NamedTuple):
    """One write on the primary: a delete (value None), a put, or a compare-and-set
    (``is_conditional``: only if the current value is ``expected``, None meaning absent)."""

    key: str
    value: str | None
    request: RequestRecord | None = None  # (client_id, seq, acked_below): exactly-once
    is_conditional: bool = False
    expected: str | None = None


class NodeService(Protocol):
    """What the handler asks of the node."""

    def check_primary(self, epoch: int | None = None) -> None: ...
    def read(self, key: str) -> str: ...
    def lookup(self, key: str) -> str | None: ...
    def read_many(self, keys: list[str]) -> dict[str, str]: ...
    def scan(self, first_stripe: int, max_entries: int, max_bytes: int, epoch: int) -> object: ...
    def write_group(self, writes: Sequence[Write]) -> list[bool | Exception]: ...
    def begin_writes(self, writes: Sequence[Write], sync_soon: bool = False) -> Any: ...
    def end_writes(self, group: Any) -> list[bool | Exception]: ...
    def confirm_read(self) -> None: ...
    def snapshot(self) -> dict[str, str]: ...
    def apply_replicated(
        self,
        epoch: int | None,
        keys: list[str],
        values: list[str],
        join_id: str | None,
        changes: list[Any],
        log_mark: Marker | None = None,
        records: FlatRecords | None = None,
    ) -> None: ...
    def status(self) -> object: ...
    def accept_join(
        self,
        epoch: int,
        backup_name: str,
        join_id: str,
        lease_ms: int,
        durable: str | None = None,
        since: Marker | None = None,
        protocol: int = 0,
    ) -> int: ...
    def sync_chunk(
        self, epoch: int, join_id: str, first_stripe: int, max_entries: int
    ) -> object: ...
    def sync_log(self, epoch: int, join_id: str, position: int, max_bytes: int) -> object: ...
    def finish_join(self, epoch: int, join_id: str) -> None: ...
    def rename_backup(self, epoch: int, join_id: str, new_name: str) -> None: ...


class PendingWrites:
    """A group of writes the event front began (NodeHandler.begin_group)."""

    __slots__ = ("began", "group", "methods")

    def __init__(self, methods: list[str], group: Any) -> None:
        self.methods = methods
        self.group = group  # the node's WriteGroup
        self.began = time.perf_counter()

    @property
    def deliveries(self) -> list[Any]:
        """The backups' replies, and the log's fsync if a syncer runs it."""
        deliveries: list[Any] = self.group.deliveries
        durable = self.group.durable
        return deliveries if durable is None else [*deliveries, (None, durable)]


class NodeHandler:
    """The Thrift service: validates arguments and delegates to the node."""

    def __init__(self, node: NodeService, limits: Limits) -> None:
        self._node = node
        self._max_key_bytes = limits.max_key_bytes
        self._max_value_bytes = limits.max_value_bytes
        # A get_many reply must fit a frame: a few hundred bytes of request naming many large
        # values would otherwise make the node hold (and send) any amount.
        self._max_reply_bytes = limits.max_frame_bytes - REPLY_OVERHEAD_BYTES

    def get(self, key: object) -> str:
        self._node.check_primary()
        try:
            return self._node.read(self._key(key))
        except (errors.DeposedError, errors.CoordinationError) as exc:
            raise errors.UnavailableError(f"cannot serve the read: {exc}") from None

    def put(self, key: object, value: object) -> None:
        self._write_one("put", [key, value])

    # --------------------------------------------------------------- the store API

    def lookup(self, key: object) -> object:
        self._node.check_primary()
        value = self._unavailable_on_failure(self._node.lookup, self._key(key))
        return Lookup(found=value is not None, value=value)

    def get_many(self, keys: object) -> dict[str, str]:
        self._node.check_primary()
        if not isinstance(keys, list):
            raise errors.BadRequestError("keys must be a list of strings")
        checked = [self._key(key) for key in keys]
        found: dict[str, str] = self._unavailable_on_failure(self._node.read_many, checked)
        limit = self._max_reply_bytes
        if _most_reply_bytes(found) > limit and (size := _reply_bytes(found)) > limit:
            raise errors.TooLargeError(
                f"get_many: the reply would take {size} bytes, over the {limit} a reply may "
                f"take: ask for fewer keys at a time"
            )
        return found

    def scan(self, first_stripe: int | None, max_entries: int | None, epoch: int | None) -> object:
        self._node.check_primary()
        first, most = _required_int(first_stripe), _required_int(max_entries)
        limit = self._max_reply_bytes
        chunk: Any = self._unavailable_on_failure(
            lambda began: self._node.scan(first, most, limit, began), epoch or 0
        )
        found = dict(zip(chunk.keys, chunk.values, strict=True))
        if _most_reply_bytes(found) > limit and (size := _reply_bytes(found)) > limit:
            raise errors.TooLargeError(
                f"scan: stripe {first} on takes {size} bytes, over the {limit} a reply may take "
                "(start the nodes with more --stripes)"
            )
        return chunk

    def put_once(self, key: object, value: object, request_id: object) -> None:
        self._write_one("put_once", [key, value, request_id])

    def remove(self, key: object, request_id: object) -> bool:
        result: bool = self._write_one("remove", [key, request_id])
        return result

    def compare_and_set(
        self, key: object, expected: object, value: object, request_id: object
    ) -> bool:
        result: bool = self._write_one("compare_and_set", [key, expected, value, request_id])
        return result

    # The writes the event front (rpc/front.py) runs in groups: ``prepare`` checks each
    # call as it arrives, ``write_group`` runs a group of them (to distinct keys) as one.
    grouped_methods = frozenset({"put", "put_once", "remove", "compare_and_set"})

    def _write_one(self, method: str, args: list[Any]) -> Any:
        write = self._prepare(method, args)
        result = self._results([method], self._node.write_group([write]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    def prepare(self, method: str, args: list[Any]) -> Write:
        return self._prepare(method, args)

    def begin_group(self, methods: list[str], writes: list[Write]) -> PendingWrites:
        """Start a group (see rpc/front.py): its ``deliveries`` are the backups' replies
        to wait for before ``end_group``."""
        return PendingWrites(methods, self._node.begin_writes(writes, sync_soon=True))

    def end_group(self, pending: PendingWrites) -> list[Any]:
        return self._results(pending.methods, self._node.end_writes(pending.group))

    def _prepare(self, method: str, args: list[Any]) -> Write:
        """The checked Write of a call to one of ``grouped_methods``; raises KVError."""
        self._node.check_primary()
        key = self._key(args[0])
        if method == "compare_and_set":
            expected, value, request_id = args[1:]
            if expected is not None:
                expected = self._text(expected, "expected", self._max_value_bytes)
            value = self._text(value, "value", self._max_value_bytes)
            return Write(key, value, _request_record(request_id), True, expected)
        if method == "remove":
            return Write(key, None, _request_record(args[1]))
        value = self._text(args[1], "value", self._max_value_bytes)
        return Write(key, value, _request_record(args[2]) if method == "put_once" else None)

    @staticmethod
    def _results(methods: list[str], outcomes: list[Any]) -> list[Any]:
        """Each write's result (None for a put, else whether it changed the store), or the
        KVError that failed it: a lost primacy or ZooKeeper session leaves its outcome
        unknown."""
        for i, (method, outcome) in enumerate(zip(methods, outcomes, strict=True)):
            if isinstance(outcome, (errors.DeposedError, errors.CoordinationError)):
                outcomes[i] = errors.ReplicationFailedError(
                    f"write not confirmed, outcome unknown: {outcome}"
                )
            elif method in ("put", "put_once") and not isinstance(outcome, Exception):
                outcomes[i] = None
        return outcomes

    def _key(self, key: object) -> str:
        """A key the store accepts: a UTF-8 string of 1 to max_key_bytes bytes. An empty one
        is refused: the seed's client never sends one, and it is mostly a mistake (an unset
        shell variable: ``kv put "$KEY" v``)."""
        checked = self._text(key, "key", self._max_key_bytes)
        if not checked:
            raise errors.BadRequestError("the key is empty (a key has at least one character)")
        return checked

    @staticmethod
    def _unavailable_on_failure(read: Any, argument: Any) -> Any:
        try:
            return read(argument)
        except (errors.DeposedError, errors.CoordinationError) as exc:
            raise errors.UnavailableError(f"cannot serve the read: {exc}") from None

    # --------------------------------------------------------------- replication

    def replicate(self, key: object, value: object) -> None:
        raise errors.StaleEpochError(
            "a bare replicate is refused: replicates come only from the current primary, "
            "with its epoch (kvstore primaries use replicate_batch)"
        )

    def replicate_batch(
        self,
        epoch: int | None,
        keys: list[str] | None,
        values: list[str] | None,
        join_id: str | None,
        changes: list[Any] | None = None,
        log_position: int | None = None,
        log_id: object = None,
        record_clients: list[str] | None = None,
        record_seqs: list[int] | None = None,
        record_acked: list[int] | None = None,
    ) -> None:
        keys, values = keys or [], values or []
        if len(keys) != len(values):
            raise errors.BadRequestError("replicate_batch: keys and values differ in length")
        if changes and any(not isinstance(c.key, str) for c in changes):
            raise errors.BadRequestError("replicate_batch: every change needs a key")
        records: FlatRecords | None = None
        if record_clients is not None or record_seqs is not None or record_acked is not None:
            if (
                record_clients is None
                or record_seqs is None
                or record_acked is None
                or not len(record_clients) == len(record_seqs) == len(record_acked) == len(keys)
            ):
                raise errors.BadRequestError(
                    "replicate_batch: the record lists must all be as long as keys"
                )
            records = (record_clients, record_seqs, record_acked)
        mark = _marker(epoch, log_id, log_position)
        self._node.apply_replicated(epoch, keys, values, join_id, changes or [], mark, records)

    def dump(self) -> dict[str, str]:
        node = self._node
        node.check_primary()
        snapshot = node.snapshot()
        try:
            node.confirm_read()
        except (errors.DeposedError, errors.CoordinationError) as exc:
            raise errors.UnavailableError(f"cannot serve the dump: {exc}") from None
        return snapshot

    def status(self) -> object:
        return self._node.status()

    def join(
        self,
        epoch: int | None,
        backup_id: object,
        join_id: object,
        lease_ms: int | None,
        durable_id: object = None,
        log_epoch: int | None = None,
        log_id: object = None,
        log_position: int | None = None,
        protocol: int | None = None,
    ) -> int:
        return self._node.accept_join(
            _required_int(epoch),
            self._text(backup_id, "backup_id", 256),
            self._text(join_id, "join_id", 256),
            max(1, _required_int(lease_ms)),
            None if durable_id is None else self._text(durable_id, "durable_id", 256),
            _marker(log_epoch, log_id, log_position),
            protocol or 0,
        )

    def sync_log(
        self, epoch: int | None, join_id: object, position: int | None, max_bytes: int | None
    ) -> object:
        return self._node.sync_log(
            _required_int(epoch),
            self._text(join_id, "join_id", 256),
            _required_int(position),
            max(1, _required_int(max_bytes)),
        )

    def sync_fetch(
        self, epoch: int | None, join_id: object, first: int | None, most: int | None
    ) -> object:
        return self._node.sync_chunk(
            _required_int(epoch),
            self._text(join_id, "join_id", 256),
            _required_int(first),
            _required_int(most),
        )

    def join_done(self, epoch: int | None, join_id: object) -> None:
        self._node.finish_join(_required_int(epoch), self._text(join_id, "join_id", 256))

    def backup_renamed(self, epoch: int | None, join_id: object, backup_id: object) -> None:
        self._node.rename_backup(
            _required_int(epoch),
            self._text(join_id, "join_id", 256),
            self._text(backup_id, "backup_id", 256),
        )

    @staticmethod
    def _text(value: object, what: str, max_bytes: int) -> str:
        if not isinstance(value, str):
            raise errors.BadRequestError(f"{what} is required and must be a UTF-8 string")
        if len(value) * 4 > max_bytes and len(value.encode()) > max_bytes:
            raise errors.TooLargeError(f"{what} is larger than {max_bytes} bytes")
        return value


REPLY_OVERHEAD_BYTES = 1024  # a reply's header and framing, generously


def _most_reply_bytes(found: dict[str, str]) -> int:
    """At most the encoded size of a get_many reply's entries (cheap: by characters)."""
    return 4 * (sum(map(len, found)) + sum(map(len, found.values()))) + 9 * len(found)


def _reply_bytes(found: dict[str, str]) -> int:
    """The encoded size of a get_many reply's entries (9 bytes of framing each)."""
    return sum(len(k.encode()) + len(v.encode()) + 9 for k, v in found.items())


def _request_record(request_id: Any) -> RequestRecord | None:
    """(client_id, seq, acked_below) of a RequestId (or of the tuple of them that
    framecheck.parse_usual_call decodes a put_once's into), or None when the write has none."""
    if request_id is None:
        return None
    if type(request_id) is tuple:
        record: RequestRecord = request_id
    else:
        record = (request_id.client_id, request_id.seq, request_id.acked_below)
    client_id, seq, acked_below = record
    if not client_id:
        return None
    if not isinstance(client_id, str) or len(client_id) > MAX_CLIENT_ID_BYTES:
        raise errors.BadRequestError(f"client_id must be a string of at most {MAX_CLIENT_ID_BYTES}")
    if not isinstance(seq, int) or not isinstance(acked_below, int):
        raise errors.BadRequestError("a RequestId needs seq and acked_below")
    return record


def _marker(epoch: object, log_id: object, position: object) -> Marker | None:
    """(epoch, log_id, position) of a primary's log if all three are given and sane."""
    if not (isinstance(epoch, int) and isinstance(log_id, str) and isinstance(position, int)):
        return None
    if position < 0 or not 0 < len(log_id) <= 64:
        raise errors.BadRequestError("a log position needs a log id and must be >= 0")
    return epoch, log_id, position


def _required_int(value: int | None) -> int:
    if not isinstance(value, int):
        raise errors.BadRequestError("a required integer argument is missing")
    return value
