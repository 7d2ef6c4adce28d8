"""The study spread over several machines with DVC's own remote and run-cache, no scheduler of ours.

Two workers clone the same commit, each reproduces its share and pushes the
outputs and the run-cache to a shared remote; a third clone then assembles the
comparison with `dvc repro --pull` without training or evaluating anything.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import make_project, run
from test_reliability import QUICK, stages_run

pytestmark = pytest.mark.e2e

RUNS = [f"tiny-4bit-{config}" for config in QUICK["run"]["configs"]]
SHARES = {  # worker: the stages it reproduces
    "worker-a": [f"train@{RUNS[0]}", f"evaluate@{RUNS[0]}"],
    "worker-b": [
        f"train@{RUNS[1]}",
        f"evaluate@{RUNS[1]}",
        "baseline@tiny-4bit",
        "classical",
        "probe@tiny-4bit",
        "references",
    ],
}


def work(clone: Path, share: list[str]) -> str:
    """One worker's turn: reproduce its share, push outputs and run-cache; its repro output."""
    output = run(["dvc", "repro", *share], clone).stdout
    run(["dvc", "push", "--run-cache"], clone)
    return output


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """The shared remote filled by both workers at once, and the assembling clone's repro."""
    root = tmp_path_factory.mktemp("scale")
    origin = make_project(root / "origin", QUICK)
    run(["dvc", "remote", "add", "-d", "shared", str(root / "remote")], origin)
    run(["git", "commit", "-qam", "shared DVC remote"], origin)
    for name in [*SHARES, "assembler"]:
        run(["git", "clone", "-q", str(origin), name], root)
    with ThreadPoolExecutor(len(SHARES)) as pool:
        jobs = {name: pool.submit(work, root / name, share) for name, share in SHARES.items()}
        outputs = {name: job.result() for name, job in jobs.items()}
    outputs["assembler"] = run(["dvc", "repro", "--pull"], root / "assembler").stdout
    return {"root": root, "outputs": outputs}


def test_each_worker_trains_only_its_share(study):
    for name, share in SHARES.items():
        trained = [stage for stage in stages_run(study["outputs"][name]) if stage.startswith("train@")]
        assert trained == [stage for stage in share if stage.startswith("train@")], name


def test_the_assembling_clone_trains_nothing(study):
    output = study["outputs"]["assembler"]
    assert "Running stage 'train@" not in output, output


def test_the_assembling_clone_runs_only_compare(study):
    """Everything else is restored from the run-cache the workers pushed."""
    output = study["outputs"]["assembler"]
    assert stages_run(output) == ["compare"], output
    assert f"Stage 'train@{RUNS[0]}' is cached" in output and f"Stage 'train@{RUNS[1]}' is cached" in output


def test_the_assembled_study_lists_both_runs_and_the_baseline(study):
    assembler = study["root"] / "assembler"
    summary = json.loads((assembler / "reports/study.json").read_text())
    assert set(summary["runs"]) == set(RUNS) and summary["missing"] == []
    assert json.loads(run(["dvc", "status", "--json"], assembler).stdout) == {}
    assert (assembler / "metrics/baseline/tiny-4bit/eval.json").is_file()


def test_the_assembled_metrics_are_the_workers(study):
    root = study["root"]
    for worker, run_name in zip(SHARES, RUNS):
        for name in ("eval.json", "evaluation.json", "train.json"):
            path = Path("metrics/runs", run_name, name)
            assert (root / "assembler" / path).read_bytes() == (root / worker / path).read_bytes(), path
