"""Imports point down the layers (ARCHITECTURE.md), and no module imports itself back through others.

    0  pytrain.kernels (Triton), pytrain.data
    1  pytrain._extension, pytrain.ops
    2  pytrain.optim, pytrain.nn, pytrain.quant, pytrain.comm, pytrain.cost
    3  pytrain.trainers, pytrain.swap, pytrain.integrations
    4  pytrain.train, pytrain.distill, pytrain.cli, pytrain.bench, pytrain.info, pytrain.tune, pytrain.plot, pytrain (the package), pytrain.testing

A module may import its own layer or lower ones, at module level or inside a function (lazy imports
count: a reader and a tool follow them the same way).  Module-level imports must form no cycle.
"""
import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "pytrain.kernels": 0, "pytrain.data": 0,
    "pytrain._extension": 1, "pytrain.ops": 1,
    "pytrain.optim": 2, "pytrain.nn": 2, "pytrain.quant": 2, "pytrain.comm": 2, "pytrain.cost": 2,
    "pytrain.trainers": 3, "pytrain.swap": 3, "pytrain.integrations": 3,
    "pytrain.train": 4, "pytrain.distill": 4, "pytrain.cli": 4, "pytrain.bench": 4, "pytrain.info": 4, "pytrain.tune": 4,
    "pytrain.plot": 4, "pytrain.__main__": 4,
    "pytrain.testing": 4, "pytrain": 4,
}


def _modules() -> Dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "pytrain").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):  # pytrain/kernels is a symlink rglob does not follow
        found[f"pytrain.kernels.{path.stem}"] = path
    return found


MODULES = _modules()


def layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


def _imports(name: str, path: Path) -> Iterator[Tuple[str, bool]]:
    """(imported pytrain module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "pytrain" or target.startswith("pytrain."):
                yield target, id(node) in top_level


def test_every_module_has_a_layer():
    assert MODULES, "no pytrain modules found"
    for name in MODULES:
        layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    wrong = [f"{target} (layer {layer(target)})" for target, _ in _imports(name, MODULES[name])
             if layer(target) > layer(name)]
    assert not wrong, f"{name} (layer {layer(name)}) imports upward: {', '.join(sorted(set(wrong)))}"


def test_nothing_below_the_trainers_imports_testing_or_trainers():
    offenders = [f"{name} -> {target}" for name, path in MODULES.items() if layer(name) < 3
                 for target, _ in _imports(name, path)
                 if target.startswith(("pytrain.testing", "pytrain.trainers"))]
    assert not offenders, offenders


def test_no_import_cycles():
    graph: Dict[str, Set[str]] = {}
    for name, path in MODULES.items():
        graph[name] = set()
        for target, module_level in _imports(name, path):
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if module_level and target != name and target in MODULES and not name.startswith(target + "."):
                graph[name].add(target)
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
