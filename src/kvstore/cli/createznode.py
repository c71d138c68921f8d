"""kv-createznode: create (or, with --reset, clear) the parent znode nodes register under."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kvstore import errors
from kvstore.cli.args import (
    add_cluster_arguments,
    add_zk_auth_arguments,
    add_zk_tls_arguments,
    check_replicas_option,
    new_parser,
    report_error,
    setup_logging,
    zk_auth_from,
    zk_tls_from,
)
from kvstore.cli.interrupts import Interrupts
from kvstore.coordination import DEFAULT_REPLICAS, MAX_REPLICAS, create_parent
from kvstore.rpc import takes_connections


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser(
        prog="kv-createznode",
        description="Create the parent znode PATH (and its parents) that nodes register under. "
        "Succeeds if it exists already. With credentials (--zk-auth, --zk-auth-file or "
        "$KV_ZK_AUTH) it gets an ACL that lets only them change the cluster (anyone may read).",
        epilog="exit status: 0 done (created, or it existed; reset, secured, replication "
        "factor set as asked); 1 ZooKeeper unreachable, or the change refused (not "
        "authorized; --secure-existing, or --reset without --force, while a registered "
        "node runs; metadata under PATH that is not a kvstore cluster's); 2 bad arguments; "
        "130 interrupted (Ctrl-C; 143 SIGTERM, 129 SIGHUP): a change under way may or may "
        "not have been made",
    )
    add_cluster_arguments(parser, "parent znode, e.g. /kvstore")
    parser.add_argument(
        "--reset",
        action="store_true",
        help="also clear the cluster metadata: the next node starts a NEW, EMPTY store, a "
        "new cluster incarnation (a node whose --data-dir holds keys refuses to start or join "
        "it: move that directory aside). "
        "Only for when the data is lost anyway (every node holding it died): refused while "
        "a node registered under PATH answers at its address, unless --force",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --reset: reset even while nodes run (a serving cluster becomes a new, "
        "empty one: its in-memory nodes restart into it empty, one whose data directory "
        "holds keys refuses to and exits 1)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help=f"replication factor: how many copies of every write the cluster keeps (the "
        f"primary and N - 1 in-sync backups; 1 to {MAX_REPLICAS}). Stored in the cluster "
        f"metadata; default {DEFAULT_REPLICAS} (a primary and one backup) for a new parent. "
        "On a serving cluster the primary adapts: more backups join, or extra ones are let go",
    )
    add_zk_auth_arguments(parser)
    parser.add_argument(
        "--secure-existing",
        action="store_true",
        help="if PATH exists, give it (and its member znodes) the ACL of the credentials: "
        "writable only with them, readable by anyone. Needs credentials",
    )
    add_zk_tls_arguments(parser)
    args = parser.parse_args(argv)
    auth = zk_auth_from(parser, args)
    zk_tls = zk_tls_from(parser, args)
    if args.secure_existing and auth is None:
        parser.error(
            "--secure-existing needs credentials (--zk-auth, --zk-auth-file or $KV_ZK_AUTH)"
        )
    if args.force and not args.reset:
        parser.error("--force goes with --reset")
    check_replicas_option(parser, args.replicas)
    setup_logging("WARNING", is_quiet=True)
    with Interrupts("kv-createznode") as interrupts:
        try:
            outcome = create_parent(
                args.zk_connect,
                args.zk_path,
                reset=args.reset,
                auth=auth,
                secure_existing=args.secure_existing,
                tls=zk_tls,
                replicas=args.replicas,
                force=args.force,
                is_running=takes_connections,
            )
        except errors.KVError as exc:
            report_error("kv-createznode", exc)
            return 1
        except KeyboardInterrupt:  # (a change under way may or may not have been made)
            return interrupts.report()
    print(f"{args.zk_path}: {outcome}")
    if args.replicas == 1:  # (allowed, and sometimes meant: but never silently)
        print(
            "kv-createznode: replication factor 1: one copy, no backup; losing the primary "
            "stops the cluster, and without --data-dir loses its data",
            file=sys.stderr,
        )
    return 0
