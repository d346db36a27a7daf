"""The shape of the package, read from its source: no import cycles between its modules, and no private
``_name`` imported from another module (modules talk through public, documented seams).

Both checks walk the AST of engine/, jobs/, serve/ and cli/: module-level and function-level imports
count. Imports under ``if TYPE_CHECKING:`` never run, so they make no cycle (they still must not take
private names). An import kept inside a function only because it is heavy and optional on a light path
is allowed by ``LAZY_HEAVY`` below, with its reason; nothing else may close a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "scdrugmap_ray"
FOLDERS = ("api", "engine", "jobs", "serve", "cli")  # api/ is the root package itself

# (importer, imported) -> why the import is inside a function. Only heavy, optional imports belong here.
LAZY_HEAVY: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "api":  # pyproject maps api/ to scdrugmap_ray
        parts.pop(0)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every import of one module: (imported module, names taken, line, inside a function, typing only)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, list[str], int, bool, bool]] = []
        self._depth = 0
        self._typing = 0

    def _visit_function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node):
            self._typing += 1
            for child in node.body:
                self.visit(child)
            self._typing -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], node.lineno, self._depth > 0, self._typing > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        self.found.append((target, [a.name for a in node.names], node.lineno, self._depth > 0, self._typing > 0))


def _imports() -> list[tuple[str, str, list[str], int, bool, bool]]:
    """(importer, imported module of the package, names, line, in a function, typing only)."""
    modules = _modules()
    out = []
    for module, path in modules.items():
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for target, names, line, lazy, typing in visitor.found:
            if not target.startswith(PACKAGE + "."):
                continue
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if submodules:  # ``from pkg import submodule``
                out.extend((module, sub, [], line, lazy, typing) for sub in submodules)
                names = [n for n in names if f"{target}.{n}" not in modules]
                if not names:
                    continue
            if target in modules:
                out.append((module, target, names, line, lazy, typing))
    # importing a.b.c runs a/__init__ and a/b/__init__ first: an edge to each package above the imported
    # module, unless the importer sits inside that package (then it is already being imported)
    parents = []
    for importer, imported, _names, line, lazy, typing in out:
        parts = imported.split(".")
        for k in range(2, len(parts)):
            package = ".".join(parts[:k])
            if package in modules and not (importer == package or importer.startswith(package + ".")):
                parents.append((importer, package, [], line, lazy, typing))
    return out + parents


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    edges: dict[str, set[str]] = {}
    for importer, imported, _names, _line, lazy, typing in _imports():
        if typing or importer == imported or (lazy and (importer, imported) in LAZY_HEAVY):
            continue
        edges.setdefault(importer, set()).add(imported)
    cycles = _cycles(edges)
    detail = []
    for comp in cycles:
        members = set(comp)
        ties = sorted(f"{a} -> {b}" for a in comp for b in edges.get(a, ()) if b in members)
        detail.append("; ".join(ties))
    assert not cycles, "import cycles between modules:\n" + "\n".join(detail)


def test_no_private_names_across_modules() -> None:
    bad = [f"{importer}:{line} takes {name} from {imported}"
           for importer, imported, names, line, _lazy, _typing in _imports() if imported != importer
           for name in names if name.startswith("_")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def _private_attributes() -> list[str]:
    """``module._name`` where ``module`` is a module of the package bound by an import (``import a.b as m``,
    ``from a import b``)."""
    modules = _modules()
    bad = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(tree)
        bound: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in modules:
                        bound[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                pkg = visitor.package.split(".")
                target = (".".join(pkg[: len(pkg) - (node.level - 1)] + ([node.module] if node.module else []))
                          if node.level else node.module or "")
                for a in node.names:
                    if f"{target}.{a.name}" in modules:
                        bound[a.asname or a.name] = f"{target}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and bound[node.value.id] != module):
                bad.append(f"{module}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    return bad


def test_no_private_attributes_across_modules() -> None:
    bad = _private_attributes()
    assert not bad, "private names reached across modules:\n" + "\n".join(bad)


def test_lazy_heavy_entries_are_real() -> None:
    lazy = {(a, b) for a, b, _n, _l, is_lazy, _t in _imports() if is_lazy}
    stale = sorted(set(LAZY_HEAVY) - lazy)
    assert not stale, f"LAZY_HEAVY names imports that no longer exist inside a function: {stale}"


def test_engine_imports_none_of_the_outer_layers() -> None:
    outer = tuple(f"{PACKAGE}.{f}" for f in ("jobs", "serve", "cli"))
    bad = [f"{a}:{line} imports {b}" for a, b, _n, line, _lazy, _t in _imports()
           if a.startswith(f"{PACKAGE}.engine") and b.startswith(outer)]
    assert not bad, "\n".join(bad)


def test_ray_init_only_in_the_runtime_module() -> None:
    """Every start of Ray goes through ``engine.runtime.init_ray`` (one set of defaults: logging, dashboard)."""
    bad = []
    for module, path in _modules().items():
        if module == f"{PACKAGE}.engine.runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"):
                bad.append(f"{module}:{node.lineno}")
    assert not bad, "ray.init outside engine/runtime.py (use init_ray): " + ", ".join(bad)


def test_every_package_folder_is_packaged() -> None:
    """A new package folder (a split module) must be listed in pyproject's packages, or the wheel lacks it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {_module_name(p) for folder in FOLDERS for p in (ROOT / folder).rglob("__init__.py")}
    assert not folders - listed, f"package folders missing from pyproject.toml packages: {sorted(folders - listed)}"


def test_one_batch_token_default() -> None:
    """The batch-token defaults are assigned once, in engine/defaults.py, a module that imports nothing (the API
    reads it without loading the engine); every other module asks ``batch_tokens_for(device)``."""
    from scdrugmap_ray.engine import defaults

    assert defaults.batch_tokens_for("cuda:0") == defaults.DEFAULT_BATCH_TOKENS
    assert defaults.batch_tokens_for("cpu") == defaults.CPU_BATCH_TOKENS < defaults.DEFAULT_BATCH_TOKENS
    assert defaults.batch_tokens_for("cpu", 512) == 512
    source = (ROOT / "engine" / "defaults.py").read_text()
    assert not [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import | ast.ImportFrom)
                and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    assigned = [
        str(path.relative_to(ROOT)) for path in _modules().values()
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Assign | ast.AnnAssign)
        and any(isinstance(t, ast.Name) and t.id in ("DEFAULT_BATCH_TOKENS", "CPU_BATCH_TOKENS")
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))
    ]
    assert assigned == ["engine/defaults.py", "engine/defaults.py"], assigned
