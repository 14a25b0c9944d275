"""The package's house rules, checked on its source: short files, no import circle, no private imports.

Every library module stays under :data:`MAX_LINES` lines; the modules import each other in
floors with no circle (function-local imports included, imports of a package's ``__init__``
facade left out); no module imports another module's private (``_``-prefixed) name; and the
subpackages keep their floors (:data:`FLOORS`): the HoRA layers (``hmoe_sim.hora``) never import
the fine-tuning experiments built on them (``hmoe_sim.finetune``), and nothing but the
experiments and the plotting module imports the experiments.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hmoe_sim"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
#: subpackage -> the subpackages and modules it must not import (at any depth, function-local imports included)
FLOORS = {"hmoe_sim.hora": ("hmoe_sim.finetune",)}
#: the only modules outside ``hmoe_sim.finetune`` that may import it
FINETUNE_IMPORTERS = ("hmoe_sim.plotting",)
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import of an ``hmoe_sim`` module in ``name``, at any depth."""
    tree = ast.parse(MODULES[name].read_text())
    base = name if name in PACKAGES else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "hmoe_sim"]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - node.level + 1]
                module = ".".join([*anchor, module] if module else anchor)
            if module.split(".")[0] == "hmoe_sim":
                out.append((module, [a.name for a in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the non-package modules it imports (``from pkg import submodule`` counts as that module)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for module, names in _imports(name):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES] or [module]
            graph[name] |= {t for t in targets if t in MODULES and t not in PACKAGES and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_no_private_name_imported_across_modules():
    private = [f"{name}: from {module} import {n}" for name in MODULES for module, names in _imports(name)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_no_library_file_over_the_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_subpackages_keep_their_floors():
    broken = [f"{name} imports {module}" for name in MODULES for package, banned in FLOORS.items()
              if _inside(name, package) for module, _ in _imports(name) for ban in banned if _inside(module, ban)]
    assert broken == []


def test_only_the_experiments_and_plotting_import_the_finetune_package():
    importers = sorted({name for name in MODULES if not _inside(name, "hmoe_sim.finetune")
                        for module, _ in _imports(name) if _inside(module, "hmoe_sim.finetune")})
    assert set(importers) <= set(FINETUNE_IMPORTERS), importers
