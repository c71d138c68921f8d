"""The Thrift service of a storage node: validates arguments and delegates to the node.

The handler knows the node only through :class:`NodeService`, the calls it makes;
StorageNode implements it (the node builds the handler, never the other way round).
Every refusal is a KVError (sent as a TApplicationException with its code, see rpc.py).
"""

from __future__ import annotations

from typing import Any, Protocol

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


class NodeService(Protocol):
    """What the handler asks of the node."""

    def check_primary(self, epoch: int | None = None) -> None: ...
    def read(self, key: str) -> str: ...
    def lookup(self, key: str) -> str | None: ...
    def read_many(self, keys: list[str]) -> dict[str, str]: ...
    def write(
        self,
        key: str,
        value: str | None,
        request: RequestRecord | None,
        is_conditional: bool = False,
        expected: str | None = None,
    ) -> bool: ...
    def replicate_put(self, key: str, value: str) -> None: ...
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


class NodeHandler:
    """The Thrift service: validates arguments and delegates to the node."""

    def __init__(self, node: NodeService, limits: Limits) -> None:
        self._node = node
        self._max_key_bytes = limits.max_key_bytes
        self._max_value_bytes = limits.max_value_bytes

    def get(self, key: object) -> str:
        self._node.check_primary()
        try:
            return self._node.read(self._text(key, "key", self._max_key_bytes))
        except (errors.DeposedError, errors.CoordinationError) as exc:
            raise errors.UnavailableError(f"cannot serve the read: {exc}") from None

    def put(self, key: object, value: object) -> None:
        self._node.check_primary()
        checked_key = self._text(key, "key", self._max_key_bytes)
        checked_value = self._text(value, "value", self._max_value_bytes)
        try:
            self._node.replicate_put(checked_key, checked_value)
        except (errors.DeposedError, errors.CoordinationError) as exc:
            raise errors.ReplicationFailedError(
                f"put not confirmed, outcome unknown: {exc}"
            ) from None

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
        return found

    def put_once(self, key: object, value: object, request_id: object) -> None:
        self._write(key, self._text(value, "value", self._max_value_bytes), request_id)

    def remove(self, key: object, request_id: object) -> bool:
        return self._write(key, None, request_id)

    def compare_and_set(
        self, key: object, expected: object, value: object, request_id: object
    ) -> bool:
        if expected is not None:
            expected = self._text(expected, "expected", self._max_value_bytes)
        value = self._text(value, "value", self._max_value_bytes)
        return self._write(key, value, request_id, True, expected)

    def _write(
        self,
        key: object,
        value: str | None,
        request_id: object,
        is_conditional: bool = False,
        expected: str | None = None,
    ) -> bool:
        self._node.check_primary()
        checked_key = self._key(key)
        request = _request_record(request_id)
        try:
            return self._node.write(checked_key, value, request, is_conditional, expected)
        except (errors.DeposedError, errors.CoordinationError) as exc:
            raise errors.ReplicationFailedError(
                f"write not confirmed, outcome unknown: {exc}"
            ) from None

    def _key(self, key: object) -> str:
        return self._text(key, "key", self._max_key_bytes)

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


def _request_record(request_id: Any) -> RequestRecord | None:
    """(client_id, seq, acked_below) of a RequestId, or None when the write has none."""
    if request_id is None or not request_id.client_id:
        return None
    client_id = request_id.client_id
    if not isinstance(client_id, str) or len(client_id) > MAX_CLIENT_ID_BYTES:
        raise errors.BadRequestError(f"client_id must be a string of at most {MAX_CLIENT_ID_BYTES}")
    seq, acked_below = request_id.seq, request_id.acked_below
    if not isinstance(seq, int) or not isinstance(acked_below, int):
        raise errors.BadRequestError("a RequestId needs seq and acked_below")
    return client_id, seq, acked_below


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
