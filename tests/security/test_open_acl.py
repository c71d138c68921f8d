"""Which parent ACLs count as writable by anyone (no ZooKeeper needed): a node given
credentials refuses such a parent, kv-createznode says so."""

from __future__ import annotations

from kazoo.security import READ_ACL_UNSAFE, make_acl, make_digest_acl

from kvstore.coordination import _is_world_writable, secure_acl


def test_the_secure_acl_and_read_only_entries_are_not_open() -> None:
    assert not _is_world_writable(secure_acl("kvstore:secret"))
    assert not _is_world_writable(
        [*secure_acl("kvstore:secret"), make_acl("ip", "0.0.0.0/0", read=True)]
    )


def test_world_write_is_open() -> None:
    assert _is_world_writable(
        [make_digest_acl("kvstore", "secret", all=True), make_acl("world", "anyone", write=True)]
    )


def test_an_ip_entry_that_writes_is_open() -> None:
    # ip:0.0.0.0/0 matches every session: a node with credentials once started on such a
    # parent, and anonymous sessions could still rewrite its metadata and delete members.
    for network in ("0.0.0.0/0", "127.0.0.1"):
        acl = [make_acl("ip", network, all=True), *READ_ACL_UNSAFE]
        assert _is_world_writable(acl)
        assert _is_world_writable([make_acl("ip", network, delete=True)])
