"""The command-line programs, one module each; the only package that parses argv.

``kv``, ``kv-node``, ``kv-client``, ``kv-createznode``, ``kv-check``, ``kv-demo`` and
``kv-bench`` are the ``main`` functions of the modules of the same name;
``python -m kvstore NAME ...`` runs them too (:func:`main`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("kv", "node", "client", "createznode", "check", "demo", "bench")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvstore COMMAND ...``: run one program (imported only when chosen)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(f"usage: python -m kvstore {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    program = importlib.import_module(f"kvstore.cli.{args[0]}")
    code: int = program.main(args[1:])
    return code
