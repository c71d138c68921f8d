"""Where a benchmark cluster's nodes keep their store: the ``--storage`` dimension.

- ``memory``: no data directory (the seed's in-memory store);
- ``disk``: ``kv-node --data-dir <run dir>/node-<i> --fsync batch`` (write-ahead log and
  snapshots; concurrent writes share one fsync, each write acknowledged once it is on disk
  on every in-sync replica);
- ``disk-always``: the same with ``--fsync always`` (an fsync per append, shared with no other).

Invariants: every node of a run gets a data directory of its own, under the run's work
directory, which does not exist before the run (a fresh store, so every history starts from
empty registers); the caller removes it after a run whose check passed and keeps it otherwise.
"""

from __future__ import annotations

from pathlib import Path

from kvstore.local.cluster import LocalCluster

STORAGE_KINDS = ("memory", "disk", "disk-always")
_FSYNC = {"disk": "batch", "disk-always": "always"}


def node_args(storage: str, data_dir: Path) -> list[str]:
    """The kv-node arguments of one node for ``storage`` (one of :data:`STORAGE_KINDS`),
    keeping its store in ``data_dir`` if on disk."""
    if storage == "memory":
        return []
    if storage in _FSYNC:
        return ["--data-dir", str(data_dir), "--fsync", _FSYNC[storage]]
    raise ValueError(f"unknown storage kind {storage!r} (expected one of {STORAGE_KINDS})")


def use_storage(cluster: LocalCluster, storage: str, run_dir: Path) -> Path | None:
    """Give each node of ``cluster`` (not started yet) the arguments for ``storage``, node i
    keeping its store in ``run_dir/node-<i>``. Returns ``run_dir`` if anything goes there."""
    for i, node in enumerate(cluster.nodes):
        node.extra_args += node_args(storage, run_dir / f"node-{i}")
    return None if storage == "memory" else run_dir
