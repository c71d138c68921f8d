"""kv-certs: write a throwaway CA and node, client and ZooKeeper certificates for mutual TLS."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvstore.cli.args import new_parser, report_error
from kvstore.local.certs import (
    DEFAULT_NODE_CERTIFICATES,
    add_certificates,
    tls_args,
    write_certificates,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser(
        prog="kv-certs",
        description="Write a throwaway CA (ca.crt, ca.key) and certificates signed by it, as "
        "PEM files in DIR: node.crt/node.key (OU=node: a node, which may replicate; one "
        "certificate all nodes may share), node-1.crt/node-1.key ... node-N.crt/node-N.key "
        "(OU=node, each with its own CN: give each node its own, so that a backup accepts "
        "replication only from the primary's certificate and the primary accepts a join only "
        "from its backup's; see SECURITY.md), client.crt/client.key (a client: reads and "
        "writes only) and zookeeper.crt/zookeeper.key (for a ZooKeeper TLS port on "
        "127.0.0.1/localhost: its clients check the host name). Private keys are 0600. "
        "For tests and trials: keep ca.key away from the nodes in earnest use. "
        "If DIR holds a CA already, it is kept: only the certificates DIR lacks are written, "
        "signed by it (kv-certs --nodes 4 DIR adds node-4 for a new node); none is "
        "overwritten.",
        epilog="exit status: 0 written (or nothing was missing); 1 DIR cannot be written, or "
        "its CA cannot be read; 2 bad arguments; 130 interrupted (Ctrl-C)",
    )
    parser.add_argument("directory", metavar="DIR", help="where to write (created if missing)")
    parser.add_argument(
        "--nodes",
        metavar="N",
        type=int,
        default=DEFAULT_NODE_CERTIFICATES,
        help="how many per-node certificates to write, node-1 to node-N "
        f"(default {DEFAULT_NODE_CERTIFICATES}; 0: only the shared node.crt)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write a new CA and every certificate over those already in DIR (nodes and "
        "clients holding the old ones can no longer connect)",
    )
    args = parser.parse_args(argv)
    if args.nodes < 0:
        parser.error("--nodes cannot be negative")
    if not args.force and (Path(args.directory) / "ca.key").exists():
        return _add_missing(args.directory, args.nodes)
    try:
        files = write_certificates(args.directory, nodes=args.nodes)
    except OSError as exc:
        report_error("kv-certs", exc)
        return 1
    per_node = " ".join(f"node-{i}.crt node-{i}.key" for i in range(1, args.nodes + 1))
    print(
        f"wrote {files.directory}/: ca.crt ca.key node.crt node.key "
        + (f"{per_node} " if per_node else "")
        + "client.crt client.key zookeeper.crt zookeeper.key"
    )
    example = files.node_numbered(1) if args.nodes else files.node
    print("  kv-node HOST PORT ZK PATH " + " ".join(tls_args(example)))
    print("  kv " + " ".join(tls_args(files.client)) + " get KEY")
    return 0


def _add_missing(directory: str, nodes: int) -> int:
    """DIR holds a CA: keep it (certificates signed by it stay valid) and write only the
    certificates DIR lacks."""
    try:
        written = add_certificates(directory, nodes)
    except (OSError, ValueError) as exc:
        report_error("kv-certs", f"{directory} holds a CA (ca.key), kept: {exc}")
        return 1
    if not written:
        print(
            f"{_shown(directory)} holds a CA and every certificate asked for: nothing written "
            "(--nodes N adds node-N; --force replaces everything)"
        )
        return 0
    files = " ".join(f"{name}.crt {name}.key" for name in written)
    print(f"kept the CA in {_shown(directory)}; wrote {files}, signed by it")
    return 0


def _shown(directory: str) -> str:
    """The directory as a message shows it: one slash at its end (certs, certs/: certs/)."""
    return directory.rstrip("/") + "/"
