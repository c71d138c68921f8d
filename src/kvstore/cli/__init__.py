"""The command-line programs, one module each; the only package that parses argv.

``kv``, ``kv-node``, ``kv-client``, ``kv-createznode``, ``kv-check``, ``kv-demo``,
``kv-bench`` and ``kv-certs`` are the ``main`` functions of the modules of the same name;
``python -m kvstore NAME ...`` runs them too (:func:`main`). Either way they start through
:func:`run` (the installed commands through the ``*_command`` functions here), which imports
the program only then: Ctrl-C while it loads (a few tenths of a second) is the program's one
line and exit 130 too, not a traceback. This module imports nothing else of kvstore.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it
EXIT_BROKEN_PIPE = 141  # the output's reader went away: 128 + SIGPIPE, as for cat
COMMANDS = {
    "kv": "read and write keys (get, put, del, cas, mget, status, dump, load)",
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
        if args and not is_help:
            print(f"kvstore: no program {args[0]!r} (see the list above)", file=sys.stderr)
        return 0 if is_help else 2
    return run(args[0], args[1:])


def run(command: str, argv: Sequence[str] | None = None) -> int:
    """Import program ``command`` (a key of COMMANDS) and run its ``main(argv)``. Ctrl-C
    (KeyboardInterrupt) that the program does not handle itself, while it is imported
    above all, ends it with "PROG: interrupted" and exit 130."""
    try:
        program = importlib.import_module(f"kvstore.cli.{command}")
        code: int = program.main(argv)
    except KeyboardInterrupt:
        print(f"{program_name(command)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # what read our output stopped reading (kv dump | head): as cat
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no flush error)
        return EXIT_BROKEN_PIPE
    return code


def program_name(command: str) -> str:
    """``kv`` for kv, ``kv-node`` for node, ..."""
    return "kv" if command == "kv" else f"kv-{command}"


# The installed commands (pyproject.toml's [project.scripts]): light to import, unlike the
# programs' own modules.
def kv_command() -> int:
    return run("kv")


def node_command() -> int:
    return run("node")


def client_command() -> int:
    return run("client")


def createznode_command() -> int:
    return run("createznode")


def check_command() -> int:
    return run("check")


def demo_command() -> int:
    return run("demo")


def bench_command() -> int:
    return run("bench")


def certs_command() -> int:
    return run("certs")


def _usage() -> str:
    lines = ["usage: python -m kvstore COMMAND [ARGS...]   (or kv, kv-node, kv-client, ...)", ""]
    lines += [f"  {name:<12} {what}" for name, what in COMMANDS.items()]
    lines += ["", "python -m kvstore COMMAND --help explains each one."]
    return "\n".join(lines)
