"""The command-line programs, one module each; the only package that parses argv.

``kv``, ``kv-node``, ``kv-client``, ``kv-createznode``, ``kv-check``, ``kv-demo``,
``kv-bench`` and ``kv-certs`` are the ``main`` functions of the modules of the same name;
``python -m kvstore NAME ...`` runs them too (:func:`main`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "kv": "read and write keys (get, put, del, cas, mget, status)",
    "node": "run a storage node",
    "client": "run the load generator and write an execution log",
    "createznode": "create the parent znode nodes register under",
    "check": "check an execution log for linearizability",
    "demo": "local ZooKeeper + two nodes, load, a kill -9, the verdict",
    "bench": "benchmark matrix on fresh local clusters",
    "certs": "write a throwaway CA and node/client certificates for mutual TLS",
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvstore COMMAND ...``: run one program (imported only when chosen)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        from kvstore import __version__

        print(f"kvstore {__version__}")
        return 0
    if not args or args[0] not in COMMANDS:
        is_help = bool(args) and args[0] in ("-h", "--help")
        print(_usage(), file=sys.stdout if is_help else sys.stderr)
        return 0 if is_help else 2
    program = importlib.import_module(f"kvstore.cli.{args[0]}")
    code: int = program.main(args[1:])
    return code


def _usage() -> str:
    lines = ["usage: python -m kvstore COMMAND [ARGS...]   (or kv, kv-node, kv-client, ...)", ""]
    lines += [f"  {name:<12} {what}" for name, what in COMMANDS.items()]
    lines += ["", "python -m kvstore COMMAND --help explains each one."]
    return "\n".join(lines)
