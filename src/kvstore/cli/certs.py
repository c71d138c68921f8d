"""kv-certs: write a throwaway CA and node, client and ZooKeeper certificates for mutual TLS."""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.cli.args import new_parser, report_error
from kvstore.local.certs import tls_args, write_certificates


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser(
        prog="kv-certs",
        description="Write a throwaway CA (ca.crt, ca.key) and three certificates signed by "
        "it, as PEM files in DIR: node.crt/node.key (OU=node: a node, which may replicate), "
        "client.crt/client.key (a client: reads and writes only) and zookeeper.crt/"
        "zookeeper.key (for a ZooKeeper TLS port on 127.0.0.1/localhost: its clients check "
        "the host name). Private keys are 0600. "
        "For tests and trials: keep ca.key away from the nodes in earnest use.",
        epilog="exit status: 0 written; 1 DIR cannot be written; 2 bad arguments",
    )
    parser.add_argument("directory", metavar="DIR", help="where to write (created if missing)")
    args = parser.parse_args(argv)
    try:
        files = write_certificates(args.directory)
    except OSError as exc:
        report_error("kv-certs", exc)
        return 1
    print(
        f"wrote {files.directory}/: ca.crt ca.key node.crt node.key client.crt client.key "
        "zookeeper.crt zookeeper.key"
    )
    print("  kv-node HOST PORT ZK PATH " + " ".join(tls_args(files.node)))
    print("  kv " + " ".join(tls_args(files.client)) + " get KEY")
    return 0
