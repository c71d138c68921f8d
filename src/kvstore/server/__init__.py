"""The storage node: lifecycle and primary role (node), backup and standby roles (follower),
primary->backup forwarding and the backup's fence and lease (replication), the Thrift handler
(handler) and the striped in-memory map (storage).

Depends on the wire (rpc, idl) and ZooKeeper (coordination) layers; never on the client.
"""
