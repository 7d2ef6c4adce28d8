"""Every entry point calls ``triage.runtime.setup()`` before anything imports mlx.

MLX binds its BLAS when it is loaded, so the set-up (triage/runtime/__init__.py)
must run first in each process: the stages, ``python -m triage``, the bench
scripts and the tests' conftest.py. Checked twice: statically (ast: a
module-level call, and no import before it that may load mlx), and by running
each entry point's ``--help`` in a fresh interpreter whose import hook stops
the process the moment mlx is imported before the set-up has run. Both checks
are shown to fail on a broken stage.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SETUP = "triage.runtime.setup"
MLX = ("mlx", "mlx_lm")
MLX_BEFORE_SETUP = 97  # the guard's exit status

GUARD = f"""
import os, runpy, sys, traceback

class MlxBeforeSetup:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MLX!r}:
            runtime = sys.modules.get("triage.runtime")
            if runtime is None or getattr(runtime, "settled", lambda: None)() is None:
                sys.stderr.write(f"{{name}} imported before {SETUP}() ran:\\n" + "".join(traceback.format_stack()))
                sys.stderr.flush()
                os._exit({MLX_BEFORE_SETUP})
        return None

sys.meta_path.insert(0, MlxBeforeSetup())
kind, target, *args = sys.argv[1:]
if kind == "module":
    sys.argv = [target, *args]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python target` would
    sys.argv = [target, *args]
    runpy.run_path(target, run_name="__main__")
"""


def _imports(path: Path, names: tuple[str, ...]) -> bool:
    """Whether ``path`` imports any of the top-level packages ``names`` anywhere."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        modules = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and not node.level
            else []
        )
        if any(module.split(".")[0] in names for module in modules):
            return True
    return False


def entry_points(root: Path = ROOT) -> list[Path]:
    """Every script a user or DVC runs that may load mlx, and the tests' conftest.py."""
    bench = [path for path in sorted((root / "bench").glob("*.py")) if _imports(path, ("triage", *MLX))]
    return [
        *sorted((root / "stages").glob("*.py")),
        root / "triage" / "__main__.py",
        *bench,
        root / "tests" / "conftest.py",
    ]


def _is_setup_call(statement: ast.stmt) -> bool:
    value = statement.value if isinstance(statement, (ast.Expr, ast.Assign, ast.AnnAssign)) else None
    return isinstance(value, ast.Call) and ast.unparse(value.func) == SETUP


def _may_load_mlx(module: str) -> bool:
    """mlx itself, or project code other than the set-up (project modules may import mlx now or later)."""
    top = module.split(".")[0]
    return top in MLX or (top == "triage" and module != "triage" and not module.startswith("triage.runtime"))


def _executed_imports(statement: ast.stmt) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module-level statement runs on import (function bodies run later)."""
    found, todo = [], [statement]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def setup_problems(source: str) -> list[str]:
    """Why a module's top level does not call the set-up before anything that may import mlx ([]: it does)."""
    body = ast.parse(source).body
    call = next((index for index, statement in enumerate(body) if _is_setup_call(statement)), None)
    if call is None:
        return [f"no module-level {SETUP}() call"]
    problems = []
    for statement in body[:call]:
        for node in _executed_imports(statement):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if not node.level
                else ["(relative import)"]
            )
            problems += [
                f"line {node.lineno}: imports {module} before {SETUP}()"
                for module in modules
                if _may_load_mlx(module) or module == "(relative import)"
            ]
    return problems


def run_guarded(target: str, *args: str, kind: str = "path", root: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a script (or ``-m`` module) in a fresh interpreter that dies if mlx is imported before the set-up."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-c", GUARD, kind, target, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


ENTRY_POINTS = entry_points()


def test_the_entry_points_are_found():
    names = {str(path.relative_to(ROOT)) for path in ENTRY_POINTS}
    assert {
        "stages/train.py",
        "stages/evaluate.py",
        "triage/__main__.py",
        "bench/run.py",
        "bench/blas.py",
        "tests/conftest.py",
    } <= names


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_entry_point_calls_setup_before_any_import_that_may_load_mlx(path: Path):
    problems = setup_problems(path.read_text(encoding="utf-8"))
    assert not problems, (
        f"{path.relative_to(ROOT)}: {'; '.join(problems)}. Call {SETUP}() right after the "
        "standard-library imports and `import triage.runtime`, and import the rest after it "
        "(see triage/runtime/__init__.py)"
    )


def test_the_runtime_package_never_imports_mlx():
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "triage" / "runtime").glob("*.py"))
        if _imports(path, MLX)
    ]
    assert not offenders


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_entry_point_runs_setup_before_mlx_is_imported(path: Path):
    """``--help`` runs every module-level import of the script (conftest.py: importing it does)."""
    if path.name == "__main__.py":
        result = run_guarded("triage", "--help", kind="module")
    else:
        result = run_guarded(str(path), *(() if path.name == "conftest.py" else ("--help",)))
    assert result.returncode != MLX_BEFORE_SETUP, result.stderr
    assert result.returncode == 0, result.stderr
    assert path.name == "conftest.py" or "usage:" in result.stdout


BROKEN_STAGE = '''"""A stage whose project import ended up above the set-up (a sorter, or a hand)."""
import argparse

import triage.runtime
from triage.train.loop import TrainingDiverged  # loads mlx

triage.runtime.setup()


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()


if __name__ == "__main__":
    main()
'''


def test_both_checks_fail_on_a_stage_that_imports_mlx_before_the_setup(tmp_path: Path):
    broken = tmp_path / "stages" / "broken.py"
    broken.parent.mkdir()
    broken.write_text(BROKEN_STAGE)
    assert setup_problems(BROKEN_STAGE) == [f"line 5: imports triage.train.loop before {SETUP}()"]
    result = run_guarded(str(broken), "--help")
    assert result.returncode == MLX_BEFORE_SETUP, (result.returncode, result.stderr)
    assert f"imported before {SETUP}() ran" in result.stderr
    assert 'broken.py", line 5' in result.stderr  # the stack names the offending import
    never = BROKEN_STAGE.replace("triage.runtime.setup()\n", "")
    assert setup_problems(never) == [f"no module-level {SETUP}() call"]
