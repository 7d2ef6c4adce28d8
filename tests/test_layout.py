"""Every stage depends on all the project code it runs, so `dvc repro` re-runs it when that code changes.

The import closure of each stage's script is followed statically (ast, nothing
is executed): every ``import`` and ``from ... import`` anywhere in a module,
function-level ones included, plus the ``__init__.py`` of every package on the
way, which Python runs on import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PACKAGE = "triage"
SCRIPT = re.compile(r"\bpython\s+(stages/\S+\.py)")


def module_path(module: str, root: Path = ROOT) -> Path | None:
    """The file a dotted project module name loads, or None when it is not project code."""
    if module.split(".")[0] != PACKAGE:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _absolute(node: ast.ImportFrom, path: Path, root: Path) -> str:
    if not node.level:
        return node.module or ""
    package = path.relative_to(root).with_suffix("").parts[:-1]  # a module's package, or an __init__'s own
    anchor = package[: len(package) - node.level + 1]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Dotted names of every module ``path`` imports.

    ``from pkg import sub`` counts ``pkg.sub`` when it is a module.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, path, root)
            names.add(base)
            names.update(
                f"{base}.{alias.name}" for alias in node.names if module_path(f"{base}.{alias.name}", root) is not None
            )
    return names


def with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(script: Path, root: Path = ROOT) -> set[Path]:
    """The project files that running ``script`` imports, directly or not."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imported_modules(path, root):
            for name in with_parents(module):
                found = module_path(name, root)
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def stage_scripts(dvc_yaml: Path) -> dict[str, tuple[Path, list[str]]]:
    """Each stage's script and its deps (matrix stages' templated deps as written)."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    out = {}
    for name, stage in stages.items():
        match = SCRIPT.search(stage["cmd"])
        assert match, f"stage {name}: cmd does not run a stages/ script: {stage['cmd']}"
        out[name] = (dvc_yaml.parent / match.group(1), [str(dep) for dep in stage.get("deps", [])])
    return out


def uncovered(files: set[Path], deps: list[str], root: Path = ROOT) -> list[str]:
    """The files no dep names, itself or through a folder that holds it."""
    dep_paths = [(root / dep).resolve() for dep in deps]
    return sorted(
        str(f.relative_to(root))
        for f in files
        if not any(f.resolve() == d or d in f.resolve().parents for d in dep_paths)
    )


STAGES = stage_scripts(ROOT / "dvc.yaml")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_depends_on_the_code_it_imports(stage):
    script, deps = STAGES[stage]
    missing = uncovered(import_closure(script), deps)
    assert not missing, f"dvc.yaml stage {stage}: its script imports {missing}, which no dep covers"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_code_dep_exists(stage):
    _, deps = STAGES[stage]
    code = [dep for dep in deps if dep.startswith((f"{PACKAGE}/", "stages/"))]
    assert all((ROOT / dep).exists() for dep in code), [dep for dep in code if not (ROOT / dep).exists()]


@pytest.mark.parametrize("stage", ["prepare", "convert", "quantize", "train", "evaluate", "baseline", "classical"])
def test_editing_the_report_reruns_only_compare(stage):
    _, deps = STAGES[stage]
    assert uncovered({ROOT / PACKAGE / "report.py"}, deps), f"{stage} would re-run when the report code changes"


def test_training_does_not_depend_on_evaluation_or_prediction_code():
    _, deps = STAGES["train"]
    for module in ("evaluate/evaluation.py", "evaluate/mc_dropout.py", "predict.py", "classical.py"):
        assert uncovered({ROOT / PACKAGE / module}, deps), f"train would re-run when {module} changes"


@pytest.mark.parametrize("stage", ["evaluate", "baseline", "classical", "compare"])
def test_evaluation_does_not_depend_on_training_code(stage):
    _, deps = STAGES[stage]
    training = set((ROOT / PACKAGE / "train").rglob("*.py"))
    assert len(uncovered(training, deps)) == len(training), f"{stage} would re-run when training code changes"


def test_the_closure_follows_function_level_and_package_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("def f():\n    from triage.sub import b\n")
    (package / "sub" / "b.py").write_text("from . import c\n")
    (package / "sub" / "c.py").write_text("import json\n")
    (package / "unused.py").write_text("")
    script = tmp_path / "stage.py"
    script.write_text("from triage.sub.a import f\n")
    closure = {str(p.relative_to(tmp_path)) for p in import_closure(script, tmp_path)}
    assert closure == {
        "stage.py",
        "triage/__init__.py",
        "triage/sub/__init__.py",
        "triage/sub/a.py",
        "triage/sub/b.py",
        "triage/sub/c.py",
    }
    assert uncovered(import_closure(script, tmp_path), ["stage.py", "triage/sub", "triage/__init__.py"], tmp_path) == []
    assert uncovered(import_closure(script, tmp_path), ["stage.py", "triage/sub/a.py"], tmp_path) == [
        "triage/__init__.py",
        "triage/sub/__init__.py",
        "triage/sub/b.py",
        "triage/sub/c.py",
    ]
