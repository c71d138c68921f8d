"""The package layout's dependency rules, asserted from the import graph of src/kvstore.

Every ``import`` and ``from ... import`` is counted, including those inside functions, so
a lazy import cannot hide a dependency. The rules (README "Layout"):

- dependencies point one way: cli -> bench/local/check/client/server -> rpc/coordination
  (-> idl) -> errors/config;
- client never imports server and server never imports client;
- check is pure: it imports nothing that touches the network;
- kazoo only in coordination, thriftpy2 only in idl and rpc, argparse only in cli;
- no import cycle between modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "kvstore"

# What each part may import from kvstore (besides itself). A part is a subpackage or a
# top-level module; "kvstore" is the package's __init__ (the public API).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": set(),
    "idl": set(),
    "rpc": {"errors", "idl"},
    "coordination": {"errors", "config"},
    "server": {"errors", "config", "idl", "rpc", "coordination"},
    "client": {"errors", "config", "idl", "rpc", "coordination"},
    "check": {"errors"},
    "local": {"errors", "config", "rpc", "coordination"},
    "bench": {"errors", "config", "rpc", "coordination", "client", "check", "local"},
    "cli": {
        "errors", "config", "idl", "rpc", "coordination",
        "server", "client", "check", "local", "bench", "kvstore",
    },
    "kvstore": {"errors", "client"},
    "__main__": {"cli"},
}  # fmt: skip
# Third-party or standard modules only these parts may import.
EXCLUSIVE: dict[str, set[str]] = {
    "kazoo": {"coordination"},
    "thriftpy2": {"idl", "rpc"},
    "argparse": {"cli"},
    "socket": {"rpc", "local", "bench"},
    "matplotlib": {"bench"},  # an optional extra: kv-bench's plots only
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}


def part_of(module: str) -> str:
    parts = module.split(".")
    return "kvstore" if len(parts) == 1 else parts[1]


def imports_in(source: str, package: str) -> Iterator[str]:
    """Every module ``source`` imports (kvstore submodules resolved; others by top name)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield candidate if candidate in MODULES else base


def imports_of(module: str) -> Iterator[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(), package)


def violations(module: str, imported: Iterator[str]) -> list[str]:
    """The rules ``module`` breaks by importing ``imported``."""
    part = part_of(module)
    found = []
    for name in imported:
        top = name.split(".")[0]
        if top == "kvstore":
            target = part_of(name)
            if target != part and target not in ALLOWED[part]:
                found.append(f"{module} imports {name}: {part} may not depend on {target}")
        elif top in EXCLUSIVE and part not in EXCLUSIVE[top]:
            found.append(f"{module} imports {top}, reserved to {sorted(EXCLUSIVE[top])}")
    return found


def kvstore_edges() -> dict[str, set[str]]:
    return {m: {i for i in imports_of(m) if i.split(".")[0] == "kvstore"} for m in MODULES}


def test_the_tree_has_the_expected_parts() -> None:
    parts = {part_of(m) for m in MODULES}
    assert parts == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_what_its_part_may(module: str) -> None:
    assert violations(module, imports_of(module)) == []


def test_no_import_cycle() -> None:
    edges = kvstore_edges()
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_rules_catch_a_lazy_import_across_parts() -> None:
    """A lazy import inside a function is seen, and client -> server is refused."""
    source = "def f():\n    from kvstore.server import node\n    import kazoo\n"
    found = violations("kvstore.client.locator", imports_in(source, "kvstore.client"))
    assert len(found) == 2, found
    assert "client may not depend on server" in found[0]


def test_test_files_have_unique_names() -> None:
    """Test directories have no __init__.py: two test files of one name would not both import."""
    names = [p.name for p in (PACKAGE_ROOT.parents[1] / "tests").rglob("test_*.py")]
    assert sorted(names) == sorted(set(names)), "rename the duplicate test file"
