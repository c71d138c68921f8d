"""kvstore: a fault-tolerant primary-backup key-value store.

Nodes serve the seed's Thrift service (framed transport, binary protocol) and
coordinate through ZooKeeper. The primary acknowledges a put only after the
in-sync backup has applied it; histories are checked for linearizability by
:mod:`kvstore.check.checker`.
"""

__version__ = "0.1.0"
