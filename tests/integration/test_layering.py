"""The import rules the tree shows (docs/architecture.md, "The tree"), checked on the
source: every `import` anywhere in a module counts, late imports included, so a cycle
cannot hide inside a function.

    wire <- peer, master        peer -/-> master, master -/-> peer
    optim, torch: the public API (`from pccl_py import ...`) and their own package
    cli, tools: anything        testing: only tests, examples and stress import it
    errors, config, types, events: the leaves everyone may use
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pccl_py

PACKAGE = Path(pccl_py.__file__).parent
LEAVES = {"pccl_py.errors", "pccl_py.config", "pccl_py.types", "pccl_py.events", "pccl_py._native"}
# layer -> layers it may import (besides itself and the leaves)
ALLOWED = {
    "wire": set(),
    "peer": {"wire"},
    "master": {"wire"},
    "testing": {"peer", "wire", "master"},
    "cli": {"*"},
    "tools": {"*"},
    "optim": {"public"},
    "torch": {"public"},
    "leaf": set(),
    "init": {"*"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    if module == "pccl_py":
        return "init"
    if module in LEAVES:
        return "leaf"
    return module.split(".")[1]


def imports_of(module: str, source: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every pccl_py import in `source`."""
    out = []
    package = module if module == "pccl_py" or source.startswith("#package") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "pccl_py"]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([target] if target else []))
            if target.split(".")[0] == "pccl_py":
                out.append((node.lineno, target, [a.name for a in node.names]))
    return out


def resolve(target: str, names: list[str]) -> list[str]:
    """The modules an import statement depends on: `from pccl_py.peer import control`
    names a submodule; `from pccl_py import Communicator` names the package."""
    found = []
    for name in names or [""]:
        sub = f"{target}.{name}" if name else target
        path = PACKAGE.parent / Path(*sub.split("."))
        if name and any(p.exists() for p in (path.with_suffix(".py"), path.with_suffix(".pyi"), path / "__init__.py")):
            found.append(sub)
        else:
            found.append(target)
    return found


def violations(module: str, source: str) -> list[str]:
    layer = layer_of(module)
    allowed = ALLOWED[layer]
    public = set(pccl_py.__all__)
    bad = []
    for line, target, names in imports_of(module, source):
        for dep in resolve(target, names):
            dep_layer = layer_of(dep)
            if dep == "pccl_py.testing" or dep_layer == "testing":
                if layer not in ("testing",):
                    bad.append(f"{module}:{line} imports the test support module {dep}")
                continue
            if dep_layer in ("leaf", layer) or "*" in allowed:
                continue
            if "public" in allowed:
                if dep == "pccl_py" and set(names) <= public:
                    continue
                bad.append(f"{module}:{line} imports {dep} ({', '.join(names)}): {layer} uses the public API only")
                continue
            if dep_layer not in allowed:
                bad.append(f"{module}:{line}: {layer} must not import {dep_layer} ({dep})")
    return bad


def sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_follow_the_layers() -> None:
    bad = [v for module, source in sources().items() for v in violations(module, source)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "module,source",
    [
        ("pccl_py.peer.example", "from pccl_py.master.server import Master\n"),
        ("pccl_py.master.example", "def f():\n    from pccl_py.peer import session\n"),
        ("pccl_py.wire.example", "import pccl_py.peer.communicator\n"),
        ("pccl_py.optim.example", "from pccl_py.peer.communicator import Communicator\n"),
        ("pccl_py.tools.example", "from pccl_py.testing import PeerGroup\n"),
    ],
)
def test_a_forbidden_import_is_caught(module: str, source: str) -> None:
    assert violations(module, source)


def test_allowed_imports_pass() -> None:
    assert not violations("pccl_py.peer.example", "from pccl_py.wire import protocol\nfrom pccl_py.errors import Aborted\n")
    assert not violations("pccl_py.optim.example", "from pccl_py import Communicator, ReduceOp\n")
    assert not violations("pccl_py.cli.example", "from pccl_py.master.server import Master\n")


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for module, source in sources().items():
        deps = {d for _, target, names in imports_of(module, source) for d in resolve(target, names)}
        # Importing a submodule runs its package's __init__, which is no dependency of
        # the importer; only the package's own imports are.
        graph[module] = {d for d in deps if d != module}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_module_over_600_lines() -> None:
    long = {module: n for module, source in sources().items() if (n := len(source.splitlines())) > 600}
    assert not long, long
