"""Loads kvstore.thrift once. The only place that knows where the IDL file lives."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import thriftpy2

_PACKAGED = Path(__file__).with_name("kvstore.thrift")
_REPO_ROOT = Path(__file__).resolve().parents[2] / "kvstore.thrift"


def _idl_path() -> Path:
    for candidate in (_PACKAGED, _REPO_ROOT):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"kvstore.thrift not found (looked at {_PACKAGED} and {_REPO_ROOT})")


kvstore_thrift: ModuleType = thriftpy2.load(str(_idl_path()), module_name="kvstore_thrift")
KeyValueService = kvstore_thrift.KeyValueService
NodeStatus = kvstore_thrift.NodeStatus
SyncChunk = kvstore_thrift.SyncChunk
