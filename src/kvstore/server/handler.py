"""The Thrift service of a storage node: validates arguments and delegates to the node.

The handler knows the node only through :class:`NodeService`, the calls it makes;
StorageNode implements it (the node builds the handler, never the other way round).
Every refusal is a KVError (sent as a TApplicationException with its code, see rpc.py).
"""

from __future__ import annotations

from typing import Protocol

from kvstore import errors
from kvstore.config import Limits


class NodeService(Protocol):
    """What the handler asks of the node."""

    def check_primary(self, epoch: int | None = None) -> None: ...
    def read(self, key: str) -> str: ...
    def replicate_put(self, key: str, value: str) -> None: ...
    def confirm_read(self) -> None: ...
    def snapshot(self) -> dict[str, str]: ...
    def apply_replicated(
        self, epoch: int | None, keys: list[str], values: list[str], join_id: str | None
    ) -> None: ...
    def status(self) -> object: ...
    def accept_join(self, epoch: int, backup_name: str, join_id: str, lease_ms: int) -> int: ...
    def sync_chunk(
        self, epoch: int, join_id: str, first_stripe: int, max_entries: int
    ) -> object: ...
    def finish_join(self, epoch: int, join_id: str) -> None: ...


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
    ) -> None:
        keys, values = keys or [], values or []
        if len(keys) != len(values):
            raise errors.BadRequestError("replicate_batch: keys and values differ in length")
        self._node.apply_replicated(epoch, keys, values, join_id)

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
        self, epoch: int | None, backup_id: object, join_id: object, lease_ms: int | None
    ) -> int:
        return self._node.accept_join(
            _required_int(epoch),
            self._text(backup_id, "backup_id", 256),
            self._text(join_id, "join_id", 256),
            max(1, _required_int(lease_ms)),
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

    @staticmethod
    def _text(value: object, what: str, max_bytes: int) -> str:
        if not isinstance(value, str):
            raise errors.BadRequestError(f"{what} is required and must be a UTF-8 string")
        if len(value) * 4 > max_bytes and len(value.encode()) > max_bytes:
            raise errors.TooLargeError(f"{what} is larger than {max_bytes} bytes")
        return value


def _required_int(value: int | None) -> int:
    if not isinstance(value, int):
        raise errors.BadRequestError("a required integer argument is missing")
    return value
