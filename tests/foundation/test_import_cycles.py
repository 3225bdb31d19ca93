"""The `pipeline` package has no import cycles among its modules (issue 16 item 5).

A cycle makes the import order matter (a name used before its module finished executing) and means two
modules share one job; the fix is to move the shared piece into the module it belongs to, or a third one.
Only module-level imports count: an import inside a function runs when it is called, long after both
modules loaded, and is how a module defers a heavy dependency (torch, mlflow, pydicom).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"

# Cycles that exist and are someone else's to break, each with the reason; empty = none tolerated.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed when the module loads: at module level, also inside a module-level if/try
    (a guarded import still runs), but not inside a function or class body, and not under
    `if TYPE_CHECKING:` (never executed)."""
    out: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                out.append(node)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if test not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)
                for h in node.handlers:
                    walk(h.body)
                walk(node.orelse)
                walk(node.finalbody)
            elif isinstance(node, ast.With):
                walk(node.body)

    walk(tree.body)
    return out


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, function-level (lazy) ones included."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def import_graph(modules: dict[str, Path], lazy: bool = False) -> dict[str, set[str]]:
    """module -> the package modules its module-level imports load (a `from pkg import name` of a
    submodule counts as that submodule; `import a.b.c` loads a, a.b and a.b.c, but only the deepest
    one is an edge: a package __init__ importing its children is not a cycle with each of them).
    `lazy`: count the imports inside functions too."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _all_imports(tree) if lazy else _top_level_imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [
                    f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names
                ]
            for t in targets:
                while t and t not in modules:  # `import pipeline.x.y` where y is a name: its module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan), each a set of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "csrc" not in p.parts}


def test_the_scan_finds_a_cycle_it_is_shown() -> None:
    # the detector itself: a two-module cycle and a three-module one are found, a chain is not
    g = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(sorted(c) for c in cycles(g)) == [["a", "b"], ["c", "d", "e"]]


def test_the_graph_sees_module_level_imports_only(tmp_path: Path) -> None:
    src = (
        "import os\n"
        "from pipeline.ingest import worker\n"
        "from pipeline.ingest.preprocess import finish_2d\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pipeline.adapt import stage\n"
        "try:\n    import pipeline.ingest.deid\nexcept ImportError:\n    pass\n"
        "def f():\n    from pipeline.ingest import build\n"
    )
    mod, empty = tmp_path / "m.py", tmp_path / "empty.py"
    mod.write_text(src)
    empty.write_text("")
    others = [f"pipeline.ingest.{n}" for n in ("worker", "preprocess", "deid", "build")] + [
        "pipeline.adapt.stage"
    ]
    edges = import_graph({"pipeline.m": mod} | {k: empty for k in others})
    assert edges["pipeline.m"] == {
        "pipeline.ingest.worker",
        "pipeline.ingest.preprocess",
        "pipeline.ingest.deid",
    }


def test_pipeline_has_no_import_cycles() -> None:
    modules = package_modules()
    assert "pipeline.ingest.worker" in modules and len(modules) > 50  # the scan really read the package
    found = set(cycles(import_graph(modules)))
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, (
        f"import cycle(s) among pipeline modules: {new}; move the shared piece into the module it belongs "
        "to (or a third module) so that the imports run one way"
    )
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"known cycle(s) {gone} are gone: remove them from KNOWN_CYCLES"


def test_ingest_and_adapt_modules_do_not_import_each_other_even_lazily() -> None:
    # ingest/preprocess.py and ingest/worker.py used to (preprocess's load_for_model imported the worker
    # inside the function): a lazy import hides a cycle from the interpreter, not from the reader. The
    # reading API (ingest/reading.py) now sits on top: reading -> worker -> preprocess.
    mine = {m: p for m, p in package_modules().items() if m.startswith(("pipeline.ingest", "pipeline.adapt"))}
    graph = {m: {t for t in ts if t in mine} for m, ts in import_graph(mine, lazy=True).items()}
    assert "pipeline.ingest.preprocess" not in _reach(graph, "pipeline.ingest.preprocess")
    assert [sorted(c) for c in cycles(graph)] == []


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules `start` reaches through its imports."""
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen
