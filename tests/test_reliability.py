"""A `dvc repro` killed at any moment recovers cleanly, and two fresh projects agree bit for bit.

The project is copied as a first `dvc repro` leaves it just before a stage (a
chain of snapshots built once), and a `dvc repro` started there is killed, with
its whole process group, while that stage runs (in one scenario twice in a row,
at two stages). Re-running `dvc repro` must then finish with every output DVC
recorded intact, no temp files left behind, training resumed from its
checkpoint, and the user's files untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import TINY_PROFILE, deep_update, make_project, run

pytestmark = pytest.mark.e2e

QUICK = deep_update(
    copy.deepcopy(TINY_PROFILE),
    {
        "data": {
            "n_examples": 60,
            "conditions": {"wording": {"valid": 10, "test": 10}, "complaint": {"valid": 10, "test": 10}},
        },
        "lora": {"iters": 6},
        "train": {"steps_per_report": 3, "steps_per_eval": 3, "steps_per_save": 3, "val_batches": 1},
        "evaluate": {"mc_samples": 2},
    },
)
"""The tiny profile, shortened: 6 steps with a checkpoint at step 3, two MC-dropout samples."""

PROFILE = deep_update(copy.deepcopy(QUICK), {"run": {"configs": ["balanced_safe"]}})
RUN = "tiny-4bit-balanced_safe"
WORK_DIRS = ("data", "models", "runs", "metrics")
USER_FILES = ("params.yaml", "data/raw")
MEASURED_KEYS = frozenset({"seconds", "train_seconds", "tokens_per_s", "peak_memory_mb"})
"""What a run measures about itself rather than computes: wall-clock training time (train.json, and
study.json's copy), training throughput and MLX's peak memory
(train.json, eval.json, study.json, the DVCLive metrics and TSVs, the memory plot and figure). Peak memory moves by a
few kB between identical runs: MLX evaluates lazily on a worker stream, so when buffers are freed
depends on timing."""

MEASURED_FIGURES = frozenset({"ed_recall_vs_memory"})

SNAPSHOTS = {  # name: the stages `dvc repro` runs to reach it from the previous snapshot
    "fresh": [],
    "quantized": ["prepare", "quantize@tiny-4bit"],
    "trained": [f"train@{RUN}"],
    "evaluated": [f"evaluate@{RUN}", "baseline@tiny-4bit"],
    "done": ["compare"],
}


def dvc_env(cwd: Path) -> dict[str, str]:
    """The environment conftest.run gives DVC, with unbuffered stage output so it can be watched live."""
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(cwd),
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` output says it ran (not those it skipped or restored)."""
    return re.findall(r"Running stage '([^']+)'", output)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def tree_digest(root: Path, names: tuple[str, ...]) -> dict[str, str]:
    """md5 of every file under the given files or directories of ``root``."""
    found = {}
    for name in names:
        for path in [root / name, *sorted((root / name).rglob("*"))]:
            if path.is_file():
                found[path.relative_to(root).as_posix()] = md5_of(path)
    return found


def build_step_by_step(project: Path, root: Path) -> dict[str, Path]:
    """Reproduce ``project`` one SNAPSHOTS step at a time, copying it aside (cache, .git and all) after each."""
    copies = {}
    for name, targets in SNAPSHOTS.items():
        if targets:
            run(["dvc", "repro", *targets], project)
        copies[name] = root / name
        shutil.copytree(project, copies[name], symlinks=True)
    return copies


@pytest.fixture(scope="module")
def fresh_studies(tmp_path_factory) -> dict:
    """Two fresh projects with the same params, built at the same time: one step by step into
    snapshots, the twin in a single `dvc repro`."""
    root = tmp_path_factory.mktemp("reliability")
    stepped, twin = (make_project(root / name, PROFILE) for name in ("stepped", "twin"))
    with ThreadPoolExecutor(2) as pool:
        snapshots = pool.submit(build_step_by_step, stepped, root)
        pool.submit(run, ["dvc", "repro"], twin).result()
        return {"snapshots": snapshots.result(), "twin": twin}


@pytest.fixture(scope="module")
def snapshots(fresh_studies) -> dict[str, Path]:
    return fresh_studies["snapshots"]


# --------------------------------------------------------------------------- #
# Faults
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Kill:
    """Kill `dvc repro` with ``signal`` while ``stage`` runs: once ``lines`` have appeared
    in its output, in order, or once a file matching ``appears`` exists."""

    stage: str
    signal: signal.Signals
    lines: tuple[str, ...] = ()
    appears: str = ""


@dataclass(frozen=True)
class Scenario:
    """Copy the ``start`` snapshot, run `dvc repro` and kill it once per kill, then let `dvc repro` finish."""

    start: str
    kills: tuple[Kill, ...]


SCENARIOS = {
    "prepare-SIGKILL,convert-SIGTERM": Scenario(
        "fresh",
        (
            # DVC has just spawned the command: the generator is running.
            Kill("prepare", signal.SIGKILL, lines=("> python stages/prepare.py",)),
            # On the next attempt, the float model is half-written in its staged directory beside models/tiny/float.
            Kill("convert@tiny", signal.SIGTERM, appears="models/tiny/.float.*"),
        ),
    ),
    # A checkpoint exists at step 3 of 6: the re-run must resume there.
    "train-SIGKILL": Scenario(
        "quantized", (Kill(f"train@{RUN}", signal.SIGKILL, appears=f"checkpoints/{RUN}/checkpoint.json"),)
    ),
    # The model is loaded and the test split is being scored.
    "evaluate-SIGTERM": Scenario(
        "trained",
        (Kill(f"evaluate@{RUN}", signal.SIGTERM, lines=(f"Running stage 'evaluate@{RUN}'", "[evaluate] BLAS")),),
    ),
    "compare-SIGKILL": Scenario("evaluated", (Kill("compare", signal.SIGKILL, lines=("> python stages/compare.py",)),)),
}


class Watched:
    """`dvc repro` in its own process group, its merged output collected line by line."""

    def __init__(self, cwd: Path):
        self.process = subprocess.Popen(
            ["dvc", "repro"],
            cwd=cwd,
            env=dvc_env(cwd),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def saw_in_order(self, expected: tuple[str, ...]) -> bool:
        remaining = list(expected)
        for line in list(self.lines):
            if remaining and remaining[0] in line:
                remaining.pop(0)
        return not remaining

    def kill_group(self, sig: signal.Signals) -> str:
        """Signal every process of the group, wait until none is left, return the output."""
        os.killpg(self.process.pid, sig)
        self.process.wait(timeout=60)
        deadline = time.time() + 30
        while live_members(self.process.pid):
            assert time.time() < deadline, f"processes survived {sig.name}: {live_members(self.process.pid)}"
            time.sleep(0.1)
        self.reader.join(timeout=10)
        return "".join(self.lines)


def live_members(group: int) -> list[int]:
    """Pids of the group's processes that are still running (zombies excluded), from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(process_group) == group and state != "Z":
            members.append(int(stat.parent.name))
    return members


def kill_at(project: Path, kill: Kill) -> str:
    """Run `dvc repro` in ``project`` and kill it at the kill's moment; the output up to then."""
    watched = Watched(project)
    deadline = time.time() + 300
    while not (watched.saw_in_order(kill.lines) if kill.lines else list(project.glob(kill.appears))):
        assert watched.process.poll() is None, "dvc repro ended before the kill:\n" + "".join(watched.lines)
        assert time.time() < deadline, "the kill's moment never came:\n" + "".join(watched.lines)
        time.sleep(0.02)
    output = watched.kill_group(kill.signal)
    assert watched.process.returncode == -kill.signal, output
    return output


UNCACHED_DIRECTORIES = {"metrics/plots/uncertainty", "reports/figures"}


def outputs_differing_from_lock(project: Path) -> list[str]:
    """Outputs recorded in dvc.lock whose files are missing or hash differently, re-hashed here.

    A directory's recorded md5 names a manifest in the cache listing each file's md5; an
    uncached directory (cache: false) has none and is left to `dvc status`.
    """
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    wrong = []
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path, recorded = project / out["path"], out["md5"]
            if recorded.endswith(".dir"):
                manifest = project / ".dvc/cache/files/md5" / recorded[:2] / recorded[2:]
                if not manifest.is_file() and out["path"] in UNCACHED_DIRECTORIES:
                    continue
                expected = {entry["relpath"]: entry["md5"] for entry in json.loads(manifest.read_text())}
                actual = {f.relative_to(path).as_posix(): md5_of(f) for f in path.rglob("*") if f.is_file()}
                if actual != expected:
                    wrong.append(out["path"])
            elif not path.is_file() or md5_of(path) != recorded:
                wrong.append(out["path"])
    return wrong


def leftovers(project: Path) -> list[str]:
    """Temp files and staged directories (any dot-name but .gitignore) under the output trees."""
    return sorted(
        path.relative_to(project).as_posix()
        for name in WORK_DIRS
        for path in (project / name).rglob(".*")
        if path.name != ".gitignore"
    )


@pytest.fixture(params=list(SCENARIOS), scope="module")
def recovered(request, snapshots, tmp_path_factory) -> dict:
    """A copy killed as the scenario says, then re-run to the end; the output of every attempt."""
    scenario = SCENARIOS[request.param]
    project = tmp_path_factory.mktemp("killed") / "project"
    shutil.copytree(snapshots[scenario.start], project, symlinks=True)
    user_files = tree_digest(project, USER_FILES)
    attempts = [kill_at(project, kill) for kill in scenario.kills]
    attempts.append(run(["dvc", "repro"], project).stdout)
    return {"scenario": scenario, "project": project, "user_files": user_files, "attempts": attempts}


def test_each_killed_stage_runs_again_on_the_next_attempt(recovered):
    attempts = recovered["attempts"]
    for kill, killed, following in zip(recovered["scenario"].kills, attempts, attempts[1:]):
        assert kill.stage in stages_run(killed), killed
        assert kill.stage in stages_run(following), following


def test_status_is_clean_and_every_recorded_output_matches(recovered):
    project = recovered["project"]
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
    assert outputs_differing_from_lock(project) == []


def test_no_temp_files_or_checkpoints_are_left(recovered):
    project = recovered["project"]
    assert leftovers(project) == []
    assert not (project / "checkpoints" / RUN).exists()


def test_user_files_are_untouched(recovered):
    assert tree_digest(recovered["project"], USER_FILES) == recovered["user_files"]


@pytest.mark.parametrize("recovered", ["train-SIGKILL"], indirect=True)
def test_training_resumes_from_its_checkpoint(recovered):
    assert "resuming from step 3" in recovered["attempts"][-1]
    train = json.loads((recovered["project"] / "metrics/runs" / RUN / "train.json").read_text())
    assert train["resumed_from_step"] == 3


# --------------------------------------------------------------------------- #
# Reproducibility
# --------------------------------------------------------------------------- #


def unmeasured(value: object) -> object:
    """``value`` with every MEASURED_KEYS entry, at any depth, replaced by a placeholder."""
    if isinstance(value, dict):
        return {k: "<measured>" if k in MEASURED_KEYS else unmeasured(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unmeasured(v) for v in value]
    return value


def comparable(path: Path) -> object:
    """A file's text with measured values masked: JSON keys, or TSV columns, named in MEASURED_KEYS; a figure
    that draws a measurement (MEASURED_FIGURES) only has to exist, every other one must be the same bytes."""
    if path.stem in MEASURED_FIGURES:
        return path.suffix
    if path.suffix == ".png":
        return md5_of(path)
    text = path.read_text()
    if path.suffix == ".json":
        return json.dumps(unmeasured(json.loads(text)), indent=2)
    if path.suffix == ".tsv":
        rows = [line.split("\t") for line in text.splitlines()]
        measured = [i for i, column in enumerate(rows[0]) if column in MEASURED_KEYS] if rows else []
        return [[cell for i, cell in enumerate(row) if i not in measured] for row in rows]
    return text


def recorded_artifacts(project: Path) -> dict[str, str]:
    """md5 of every output dvc.lock records outside metrics/ and reports/ (compared with measurements masked):
    prepared data, models, adapters."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = [out for stage in lock["stages"].values() for out in stage.get("outs", [])]
    return {out["path"]: out["md5"] for out in outs if not out["path"].startswith(("metrics/", "reports/"))}


@pytest.fixture(scope="module")
def twin(fresh_studies) -> Path:
    return fresh_studies["twin"]


def test_two_fresh_projects_record_identical_artifacts(snapshots, twin):
    artifacts = recorded_artifacts(snapshots["done"])
    assert {"data/prepared", "models/tiny/float", "models/tiny/4bit", f"runs/{RUN}/adapter"} <= artifacts.keys()
    assert recorded_artifacts(twin) == artifacts


def test_two_fresh_projects_write_identical_metrics_but_for_measurements(snapshots, twin):
    """Every metrics and report file, byte for byte once the MEASURED_KEYS values are masked."""
    files = tree_digest(snapshots["done"], ("metrics", "reports")).keys()
    assert files == tree_digest(twin, ("metrics", "reports")).keys()
    assert {
        f"metrics/runs/{RUN}/eval.json",
        f"metrics/runs/{RUN}/evaluation.json",
        f"metrics/runs/{RUN}/train.json",
        "metrics/summary.json",
        "reports/study.json",
    } <= files
    for name in files:
        assert comparable(snapshots["done"] / name) == comparable(twin / name), name
