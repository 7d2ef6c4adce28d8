"""The package's imports flow one way: stages -> (train | evaluate | report) -> model -> runtime, schema.

No module imports itself back, training and evaluation never import each other,
and the model layer imports nothing above it. So a change to training code
re-runs no evaluation stage and the reverse (dvc.yaml's deps follow the imports,
tests/test_layout.py). Walked statically (ast, nothing is executed): every
``import`` of a ``triage`` module anywhere in a file, function-level and
``TYPE_CHECKING`` ones included.
"""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT
from test_layout import PACKAGE, imported_modules, module_path

Graph = dict[str, set[str]]
APART = ("train", "evaluate")  # sibling sub-packages that share code only through lower modules
LOWER = ("triage.model", "triage.scores", "triage.schema", "triage.runtime")
UPPER = ("triage.train", "triage.evaluate", "triage.report", "triage.figures", "triage.classical", "triage.predict")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> Graph:
    """Each package module and the package modules it imports."""
    graph: Graph = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        targets = (module_path(name, root) for name in imported_modules(path, root))
        graph[module_name(path, root)] = {module_name(t, root) for t in targets if t is not None and t != path}
    return graph


def cycle_through(graph: Graph, start: str) -> list[str] | None:
    """The shortest import path from ``start`` back to itself, or None."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    return None


def cycles(graph: Graph) -> list[str]:
    """Every import cycle, once each, as 'a -> b -> a'."""
    found: dict[frozenset, str] = {}
    for module in sorted(graph):
        path = cycle_through(graph, module)
        if path and frozenset(path) not in found:
            found[frozenset(path)] = " -> ".join(path)
    return sorted(found.values())


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def crossings(graph: Graph) -> list[str]:
    """Every import between the sub-packages kept apart, as 'a imports b'."""
    return sorted(
        f"{source} imports {target}"
        for source, targets in graph.items()
        for target in targets
        if {subpackage(source), subpackage(target)} == set(APART)
    )


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(f"{package}.") for package in packages)


def upward(graph: Graph) -> list[str]:
    """Every import from the model layer (or below) of a module above it, as 'a imports b'."""
    return sorted(
        f"{source} imports {target}"
        for source, targets in graph.items()
        for target in targets
        if within(source, LOWER) and within(target, UPPER)
    )


def test_no_module_imports_itself_back():
    found = cycles(import_graph())
    assert not found, "import cycles:\n  " + "\n  ".join(found)


def test_training_and_evaluation_never_import_each_other():
    found = crossings(import_graph())
    assert not found, (
        "train and evaluate must share code through a lower module (triage.model, triage.scores), "
        "not import each other:\n  " + "\n  ".join(found)
    )


def test_the_model_layer_imports_nothing_above_it():
    found = upward(import_graph())
    assert not found, "the model layer must not import training, evaluation or reporting:\n  " + "\n  ".join(found)


def test_the_walk_finds_function_level_and_type_checking_cycles_and_crossings(tmp_path):
    files = {
        "__init__.py": "",
        "model/__init__.py": "",
        "model/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from triage.model.b import B\n",
        "model/b.py": "def f():\n    from triage.model import a\n",
        "model/c.py": "import triage.train.loop\n",
        "train/__init__.py": "",
        "train/loop.py": "from ..evaluate import metrics\n",
        "evaluate/__init__.py": "",
        "evaluate/metrics.py": "import triage.model.a\n",
    }
    for name, text in files.items():
        (tmp_path / PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PACKAGE / name).write_text(text)
    graph = import_graph(tmp_path)
    assert cycles(graph) == ["triage.model.a -> triage.model.b -> triage.model.a"]
    assert crossings(graph) == ["triage.train.loop imports triage.evaluate.metrics"]
    assert upward(graph) == ["triage.model.c imports triage.train.loop"]
