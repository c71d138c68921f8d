"""Loads kvstore.thrift once. The only place that knows where the IDL file lives.

The IDL ships inside the package (``kvstore/kvstore.thrift``; in the checkout a link to
the repository's ``kvstore.thrift``), so an installed package needs no checkout.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import thriftpy2

IDL_PATH = Path(__file__).with_name("kvstore.thrift")

kvstore_thrift: ModuleType = thriftpy2.load(str(IDL_PATH), module_name="kvstore_thrift")
KeyValueService = kvstore_thrift.KeyValueService
NodeStatus = kvstore_thrift.NodeStatus
SyncChunk = kvstore_thrift.SyncChunk
ScanChunk = kvstore_thrift.ScanChunk
LogChunk = kvstore_thrift.LogChunk
Change = kvstore_thrift.Change
Lookup = kvstore_thrift.Lookup
RequestId = kvstore_thrift.RequestId
