"""The layers of ARCHITECTURE.md, checked: every import in `workbench/` points down (or
stays on its floor), no modules import each other in a circle, and only the code that
runs in the worker or another child process imports llama.cpp's bindings.

Imports are read with `ast`, lazy ones inside functions included; only imports under
`if TYPE_CHECKING:` (annotations, never run) are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "workbench"

# Top to bottom. A module belongs to the floor of the longest prefix that names it.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("faces", ("workbench", "workbench.magics", "workbench.cli", "workbench.labext")),
    ("the public API", ("workbench.api", "workbench.api_quality", "workbench.evaluation.lm")),
    ("the session", ("workbench.session", "workbench.results", "workbench.chats")),
    ("features", ("workbench.device", "workbench.compress", "workbench.finetune",
                  "workbench.cluster", "workbench.serve", "workbench.dashboards",
                  "workbench.report", "workbench.drafts", "workbench.replicas",
                  "workbench.evaluation")),
    ("the engine, kernel side", ("workbench.engine",)),
    ("the worker side", ("workbench.worker", "workbench.kvcache")),
    ("the protocol", ("workbench.engine.protocol",)),
    ("model files", ("workbench.models",)),
    ("sensors", ("workbench.power",)),
    ("the ground", ("workbench.errors", "workbench.config", "workbench._paths",
                    "workbench._text", "workbench._cpu", "workbench._net", "workbench._tables",
                    "workbench._child", "workbench.progress", "workbench._platform",
                    "workbench._extras", "workbench.settings", "workbench._schema",
                    "workbench._tools")),
)
# Modules whose code runs in the worker or in a child process started through
# `workbench._child`: the only ones that may import `llama_cpp`.
LLAMA_CPP = ("workbench.worker", "workbench.compress._capture", "workbench.compress.quantize",
             "workbench.compress.imatrix", "workbench.compress.evaluate",
             "workbench.cluster.rpc_worker")


def _under(module: str, prefix: str) -> bool:
    if prefix == "workbench":  # the package itself, not everything in it
        return module == prefix
    return module == prefix or module.startswith(prefix + ".")


def floor_of(module: str) -> int:
    best, depth = -1, -1
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if _under(module, p) and len(p) > depth:
                best, depth = i, len(p)
    if best < 0:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS here and to "
                             "ARCHITECTURE.md")
    return best


def read_sources(root: Path = PACKAGE) -> dict[str, tuple[Path, str]]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (p, p.read_text(encoding="utf-8"))
    return out


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, except those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports(sources: dict[str, tuple[Path, str]]) -> list[tuple[str, int, str]]:
    """(importing module, line, imported module) for each workbench and llama_cpp import."""
    out = []
    for module, (path, text) in sources.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[:len(up) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base
                         for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top == "llama_cpp":
                    out.append((module, node.lineno, "llama_cpp"))
                elif top == "workbench":
                    while name not in sources and "." in name:
                        name = name.rpartition(".")[0]
                    if name != module:
                        out.append((module, node.lineno, name))
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def violations(sources: dict[str, tuple[Path, str]]) -> list[str]:
    problems = []
    edges: dict[str, set[str]] = {}
    for module, line, target in imports(sources):
        where = f"{sources[module][0].relative_to(PACKAGE.parent)}:{line}"
        if target == "llama_cpp":
            if not any(_under(module, p) for p in LLAMA_CPP):
                problems.append(f"{where}: {module} imports llama_cpp, which only the worker "
                                "and child processes may load")
            continue
        edges.setdefault(module, set()).add(target)
        src, dst = floor_of(module), floor_of(target)
        if dst < src:
            problems.append(f"{where}: {module} ({FLOORS[src][0]}) imports {target}, which is "
                            f"higher up ({FLOORS[dst][0]})")
    for group in _cycles(edges):
        problems.append("import circle: " + " -> ".join(_circle(group, edges)))
    return problems


def _circle(group: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One circle through the first module of a strongly connected group, as a path."""
    start, members = group[0], set(group)
    came: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(edges.get(v, ())):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
            if w in members and w not in came:
                came[w] = v
                todo.append(w)
    return group + group[:1]


def test_every_import_points_down() -> None:
    assert violations(read_sources()) == []


def test_no_module_is_over_600_lines() -> None:
    long = {m: n for m, (_, text) in read_sources().items() if (n := text.count("\n")) > 600}
    assert long == {}, "split these by what they hold"


def test_every_module_is_on_a_floor() -> None:
    for module in read_sources():
        floor_of(module)


@pytest.mark.parametrize("module, line, says", [
    ("workbench.models.gguf_file", "from ..api import engine",
     "workbench/models/gguf_file.py:1: workbench.models.gguf_file (model files) imports "
     "workbench.api, which is higher up (the public API)"),
    ("workbench.errors", "from .session import Session",
     "workbench/errors.py:1: workbench.errors (the ground) imports workbench.session, which "
     "is higher up (the session)"),
    ("workbench.api", "import llama_cpp",
     "workbench/api.py:1: workbench.api imports llama_cpp, which only the worker and child "
     "processes may load"),
])
def test_a_back_edge_is_named(module: str, line: str, says: str) -> None:
    sources = read_sources()
    path, text = sources[module]
    sources[module] = (path, line + "\n" + text)
    assert says in violations(sources)


def test_an_import_circle_is_named() -> None:
    sources = read_sources()
    path, text = sources["workbench.device.plan"]
    sources["workbench.device.plan"] = (path, "from . import budget\n" + text)
    assert ("import circle: workbench.device.budget -> workbench.device.plan -> "
            "workbench.device.budget") in violations(sources)


def test_annotations_only_imports_are_not_edges() -> None:
    sources = read_sources()
    path, text = sources["workbench.errors"]
    sources["workbench.errors"] = (
        path, "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
              "    from .session import Session\n" + text)
    assert violations(sources) == violations(read_sources())
