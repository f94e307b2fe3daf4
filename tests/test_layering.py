"""The import layering of ``megatron_based`` (docs/architecture.md): its wings import only downwards,

    runtime  <-  model  <-  training  <-  inference  <-  tasks  <-  (megatron_based/__init__.py, megatron_based/cli.py)

the module import graph has no cycle, and ``based_kernels`` imports none of Megatron, DeepSpeed or megatron_based.
Read from the source with ``ast`` (nothing is imported); function-local imports count like module-level ones. Imports
under ``if __name__ == "__main__":`` count for the layering but not for cycles: that code runs only when the file is
the script (``python -m``), as the module ``__main__``, which nothing imports back.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

WINGS = {"runtime": 0, "model": 1, "training": 2, "inference": 3, "tasks": 4}
TOP = len(WINGS)  # megatron_based/__init__.py and megatron_based/cli.py: may import every wing
TOP_MODULES = {"megatron_based", "megatron_based.cli"}
KERNELS_MUST_NOT_IMPORT = {"megatron", "megatron_based", "deepspeed"}


ROOT = Path(__file__).resolve().parents[1]


def package_dir(name: str) -> Path:
    """The package's folder in this checkout (``based_kernels`` lived in ``kernels/`` before issue 18)."""
    for folder in (ROOT / name, ROOT / "kernels"):
        if (folder / "__init__.py").is_file() and (folder.name == name or name == "based_kernels"):
            return folder
    raise AssertionError(f"no {name} package under {ROOT}")


def module_sources(package: str) -> dict[str, tuple[str, bool]]:
    """``{module name: (source, is a package __init__)}`` of every ``.py`` file of ``package``."""
    root = package_dir(package)
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path.read_text(encoding="utf-8"), is_package)
    return out


def is_main_block(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either operand order)."""
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
            and isinstance(node.test.ops[0], ast.Eq)):
        return False
    operands = [node.test.left, *node.test.comparators]
    return (any(isinstance(o, ast.Name) and o.id == "__name__" for o in operands)
            and any(isinstance(o, ast.Constant) and o.value == "__main__" for o in operands))


def imports_of(module: str, source: str, is_package: bool, known: set[str],
               main_blocks: bool = True) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import statement of ``module``, at any depth (function-local
    included; those under a module-level ``if __name__ == "__main__":`` only with ``main_blocks``). Relative imports
    are resolved; ``from package import name`` names the submodule where ``name`` is one of ``known``, else the
    package."""
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    if not main_blocks:
        tree.body = [node for node in tree.body if not is_main_block(node)]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found += [(s, node.lineno) for s in subs] or [(target, node.lineno)]
    return found


def nearest_known(name: str, known: set[str]) -> str | None:
    """``name`` or its closest enclosing module among ``known`` (``a.b.c`` -> ``a.b``), or None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def wing_of(module: str) -> int:
    if module in TOP_MODULES:
        return TOP
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in WINGS:
        raise AssertionError(f"{module} belongs to no wing: put it in one of {sorted(WINGS)} (tests/test_layering.py "
                             "and docs/architecture.md list them)")
    return WINGS[parts[1]]


def import_graph(sources: dict[str, tuple[str, bool]], main_blocks: bool = True) -> dict[str, dict[str, int]]:
    """``{module: {imported module of the same package: first line}}`` (``main_blocks``: see :func:`imports_of`)."""
    known = set(sources)
    graph = {}
    for module, (source, is_package) in sources.items():
        edges = {}
        for target, line in imports_of(module, source, is_package, known, main_blocks):
            target = nearest_known(target, known)
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    return [f"{src}:{line} imports {dst} (wing {wing_of(dst)} above {wing_of(src)})"
            for src, edges in sorted(graph.items()) for dst, line in sorted(edges.items())
            if wing_of(dst) > wing_of(src)]


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph():
    return import_graph(module_sources("megatron_based"))


@pytest.fixture(scope="module")
def imported_graph():
    """The graph of what importing a module imports: ``__main__`` blocks left out."""
    return import_graph(module_sources("megatron_based"), main_blocks=False)


def test_every_module_is_in_a_wing(graph):
    for module in graph:
        wing_of(module)
    assert {m.split(".")[1] for m in graph if m not in TOP_MODULES} == set(WINGS)


def test_wings_import_only_downwards(graph):
    assert upward_imports(graph) == []


def test_no_import_cycle(imported_graph):
    cycle = find_cycle(imported_graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_import_neither_megatron_nor_deepspeed():
    sources = module_sources("based_kernels")
    assert len(sources) > 1
    bad = [f"{module}:{line} imports {target}" for module, (source, is_package) in sorted(sources.items())
           for target, line in imports_of(module, source, is_package, set(sources))
           if target.split(".")[0] in KERNELS_MUST_NOT_IMPORT]
    assert bad == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checker itself: a function-local upward import and a two-module cycle are both reported."""
    sources = {
        "megatron_based": ("", True),
        "megatron_based.model": ("", True),
        "megatron_based.model.config": ("def f():\n    from ..training import loop\n", False),
        "megatron_based.training": ("", True),
        "megatron_based.training.loop": ("from . import step\n", False),
        "megatron_based.training.step": ("import megatron_based.training.loop\n", False),
    }
    graph = import_graph(sources)
    assert upward_imports(graph) == ["megatron_based.model.config:2 imports megatron_based.training.loop "
                                     "(wing 2 above 1)"]
    assert find_cycle(graph) == ["megatron_based.training.loop", "megatron_based.training.step",
                                 "megatron_based.training.loop"]


def test_main_blocks_count_for_the_layering_not_for_cycles():
    """A ``__main__`` block importing back the module that imports its file (what ``python -m`` of
    ``inference/convert.py`` does through ``inference/cli.py``) is no cycle; an upward import there still counts."""
    main = 'if __name__ == "__main__":\n    from .cli import main\n    from ..tasks import demo\n'
    sources = {
        "megatron_based": ("", True),
        "megatron_based.inference": ("", True),
        "megatron_based.inference.cli": ("def main():\n    from . import convert\n", False),
        "megatron_based.inference.convert": ("import sys\n" + main, False),
        "megatron_based.tasks": ("", True),
        "megatron_based.tasks.demo": ("", False),
    }
    assert find_cycle(import_graph(sources, main_blocks=False)) is None
    assert find_cycle(import_graph(sources)) == ["megatron_based.inference.cli", "megatron_based.inference.convert",
                                                 "megatron_based.inference.cli"]
    assert upward_imports(import_graph(sources)) == ["megatron_based.inference.convert:4 imports "
                                                     "megatron_based.tasks.demo (wing 4 above 3)"]
