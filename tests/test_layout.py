"""The package's layout holds: each room imports only the rooms below it, no module takes part in an import
cycle, and no import inside a function hides one.

Read from the source (``ast``), so every import counts: at the top, inside functions, and under
``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_gpumem"

LAYERS = (
    "core",  # the vocabulary (sample), judge, store, environment, units: neither torch nor pytest
    "ci",  # history, exports, merging worker files: data for CI, from the vocabulary
    "models",  # presets, loading, the training step
    "measure",  # meters, measurement, attribution, introspection
    "advise",  # memory model, findings, levers, what-ifs
    "oom",  # capture, fit search, leak check
    "estimate",  # the estimate backend: a recipe run on fake tensors
    "report",  # terminal, Markdown, JSON, tables
    "config",  # settings, marker, backend choice: they name every room's options
    "xdist",  # workers, packing, pinning, probe
    "",  # the surface: plugin, fixtures, cli, and the per-test and per-run objects the hooks call
)
"""Rooms, lowest first. A module may import modules of its own room or of rooms listed before it."""

LAZY = {
    "pytest_gpumem.cli": "torch and transformers are imported only by the commands that need them",
}
"""Modules allowed to import the package's own modules inside functions, and why (never a cycle)."""

NO_TORCH_OR_PYTEST = ("core", "ci")
"""Rooms that must not import torch or pytest: the CLI's compare, merge and history run without them."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else ""


def imports(module: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for each import of the package's own modules."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{module}:{child.lineno}: relative import"
                name = child.module or ""
                if name.startswith("pytest_gpumem"):
                    for alias in child.names:  # `from package import module` imports that module
                        target = f"{name}.{alias.name}"
                        found.append((target if target in MODULES else name, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("pytest_gpumem"):
                        found.append((alias.name, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def test_rooms_import_downwards_only() -> None:
    wrong = []
    for module in MODULES:
        mine = LAYERS.index(room(module))
        for target, line, _ in imports(module):
            if LAYERS.index(room(target)) > mine:
                wrong.append(f"{module}:{line} imports {target} ({room(target) or 'the surface'} is above)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = {module: {target for target, _, _ in imports(module) if target != module} for module in MODULES}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            walk(module)
    assert not cycles, "\n".join(cycles)


def test_imports_inside_functions_only_where_allowed() -> None:
    hidden = [
        f"{module}:{line} imports {target} inside a function"
        for module in MODULES
        if module not in LAZY
        for target, line, inside in imports(module)
        if inside
    ]
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("name", NO_TORCH_OR_PYTEST)
def test_lower_rooms_need_neither_torch_nor_pytest(name: str) -> None:
    heavy = []
    for module, path in MODULES.items():
        if room(module) != name:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            heavy += [f"{module}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in ("torch", "pytest")]
    assert not heavy, "\n".join(heavy)


def test_the_graph_is_read_from_real_imports() -> None:
    """The checks above see the imports they judge: the plugin imports the measured test, which imports the
    meters' protocol."""
    plugin = {target for target, _, _ in imports("pytest_gpumem.plugin")}
    assert "pytest_gpumem.measured" in plugin
    assert "pytest_gpumem.measure.meters.base" in {target for target, _, _ in imports("pytest_gpumem.measured")}
