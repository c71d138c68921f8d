"""Talking to a cluster: primary discovery through ZooKeeper watches and per-thread clients.

Depends on the wire (rpc) and ZooKeeper (coordination) layers; never on the server.
"""
