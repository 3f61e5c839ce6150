"""The shape of the package, checked from its source (nothing is imported or run).

- no import cycle between mmcli modules, counting imports at the top of a module, inside
  functions and under ``if TYPE_CHECKING:`` (a lazy import only hides a cycle);
- layering: a package imports only packages of its own layer or below (LAYERS, the
  picture in docs/architecture.md); so ``mmcli/models`` never imports ``mmcli.train`` or
  ``mmcli.cli``; nothing outside ``mmcli/cli`` imports typer or rich's console;
- size: no module over MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES
  lines (typer command functions in ``mmcli/cli`` excepted: their option declarations
  are long by nature).

Known offenders that other branches are reworking are listed in the allow-lists below;
an entry that no longer offends fails the test, so the lists only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmcli"

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

# the packages (and top-level modules) of mmcli by layer, bottom first ("mmcli": the
# package's own __init__, its version)
LAYERS: list[set[str]] = [
    {"mmcli", "errors", "modalities", "progress", "runtime", "cpu", "onednn", "workerpool"},
    {"formats"},
    {"data", "models", "plots"},
    {"preprocess", "extract", "train", "evaluate", "search", "overview", "generate"},
    {"cli"},
    {"__main__"},
]

# Known offenders in files other branches are reworking. Each entry names the branch that
# removes it; an entry that no longer offends fails the test, so these lists only shrink.

# import cycles, as sets of modules
KNOWN_CYCLES: list[frozenset[str]] = []

# modules over MAX_MODULE_LINES lines
KNOWN_LONG_MODULES: set[str] = set()

# functions over MAX_FUNCTION_LINES lines, as "path:qualified.name"
KNOWN_LONG_FUNCTIONS: set[str] = set()


# ----------------------------------------------------------------------- the source


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (``if TYPE_CHECKING:`` ones too: a type-only
    import is still a dependency)."""
    return (n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(module: str) -> Iterator[str]:
    """Everything ``module`` imports (any package), as dotted names: for ``from a import
    b`` both ``a`` and ``a.b``."""
    for node in _import_nodes(TREES[module]):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        else:
            base = _absolute(module, node)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def mmcli_imports(module: str) -> set[str]:
    """The mmcli modules ``module`` imports (``from pkg import sub`` counts as ``sub``;
    ``from pkg import name`` as ``pkg``)."""
    out = set()
    for node in _import_nodes(TREES[module]):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
            continue
        base = _absolute(module, node)
        if base not in MODULES:
            continue
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        out.update(subs)
        if len(subs) < len(node.names):
            out.add(base)
    out.discard(module)
    return out


GRAPH = {m: mmcli_imports(m) for m in MODULES}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of the graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(sorted(c), graph) for c in components]


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component  # pragma: no cover - a component always holds a cycle


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def _is_typer_command(module: str, node: ast.AST) -> bool:
    """A function of an ``mmcli/cli`` module with typer parameter declarations."""
    args = node.args.args + node.args.kwonlyargs
    return module.startswith("mmcli.cli") and any(
        a.annotation is not None and "typer." in ast.unparse(a.annotation) for a in args
    )


def function_lines(module: str, node: ast.AST) -> int:
    """Lines of a function; of a typer command, those of its body after the docstring
    (its signature is option declarations)."""
    if not _is_typer_command(module, node):
        return node.end_lineno - node.lineno + 1
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1 if body else 0


# ------------------------------------------------------------------------ the tests


def test_the_walker_sees_lazy_imports_and_cycles():
    tree = ast.parse("import os\ndef f():\n    from mmcli.models import registry, create\n")
    TREES["mmcli.__probe__"] = tree
    MODULES["mmcli.__probe__"] = PACKAGE / "__probe__.py"
    try:
        assert mmcli_imports("mmcli.__probe__") == {"mmcli.models.registry", "mmcli.models"}
    finally:
        del TREES["mmcli.__probe__"], MODULES["mmcli.__probe__"]
    cycles = import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()})
    assert cycles == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = import_cycles(GRAPH)
    found = {frozenset(c) for c in cycles}
    new = [" -> ".join(c) for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    assert not new, "import cycles: " + "; ".join(new)
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"no longer a cycle, remove from KNOWN_CYCLES: {gone}"


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_layers():
    layer = {p: i for i, names in enumerate(LAYERS) for p in names}
    unplaced = sorted({_package(m) for m in MODULES} - set(layer))
    assert not unplaced, f"put these in LAYERS (and docs/architecture.md): {unplaced}"
    upward = [
        f"{m} imports {d}"
        for m in sorted(MODULES)
        for d in sorted(GRAPH[m])
        if layer[_package(d)] > layer[_package(m)]
    ]
    assert not upward, "imports of a higher layer: " + "; ".join(upward)


def test_models_never_import_train_or_cli():
    bad = [
        f"{m} imports {name}"
        for m in MODULES
        if m.startswith("mmcli.models")
        for name in GRAPH[m]
        if name.startswith(("mmcli.train", "mmcli.cli"))
    ]
    assert not bad, bad


def test_only_the_cli_imports_typer_or_rich_console():
    bad = [
        f"{_rel(MODULES[m])} imports {name}"
        for m in MODULES
        if not m.startswith("mmcli.cli")
        for name in set(imported_names(m))
        if name == "typer" or name.startswith("typer.") or name == "rich.console"
    ]
    assert not bad, bad


def test_module_size():
    long = {
        _rel(path): n
        for path in MODULES.values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    new = {p: n for p, n in long.items() if p not in KNOWN_LONG_MODULES}
    assert not new, f"modules over {MAX_MODULE_LINES} lines: {new}"
    gone = sorted(KNOWN_LONG_MODULES - set(long))
    assert not gone, (
        f"no longer over {MAX_MODULE_LINES} lines, remove from KNOWN_LONG_MODULES: {gone}"
    )


def test_function_size():
    long = {}
    for m, tree in TREES.items():
        path = _rel(MODULES[m])
        for name, node in _functions(tree):
            n = function_lines(m, node)
            if n > MAX_FUNCTION_LINES:
                long[f"{path}:{name}"] = n
    new = {k: n for k, n in long.items() if k not in KNOWN_LONG_FUNCTIONS}
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines: {new}"
    gone = sorted(KNOWN_LONG_FUNCTIONS - set(long))
    assert not gone, f"no longer over {MAX_FUNCTION_LINES} lines, remove: {gone}"
