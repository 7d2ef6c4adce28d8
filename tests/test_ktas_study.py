"""The study on KTAS: scripts/ktas-study.sh puts the data in place safely, and the pipeline runs end to end on it.

The real data is read from ../shared/data/ktas/ (never copied into the repository); the
end-to-end test writes its first 60 visits into a temporary project and skips when absent.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SHARED_DATA, TINY_PROFILE, deep_update, make_project, run
from test_importers import VISIT, write_ktas
from triage.data.ktas import NURSE_COLUMN, read_ktas_csv
from triage.schema import SPLITS, read_examples

KTAS_CSV = SHARED_DATA / "ktas" / "data.csv"
SCRIPT = ROOT / "scripts" / "ktas-study.sh"
TARGET = "data/raw/ktas/data.csv"
ROWS = 60
KTAS_PROFILE = deep_update(copy.deepcopy(TINY_PROFILE), {"data": {"source": "ktas", "path": TARGET}})
RUNS = ("tiny-4bit-medical_fast", "tiny-4bit-balanced_safe")
NURSE_MAP = {"1": "ED", "2": "ED", "3": "ED", "4": "GP", "5": "HOME"}


# --------------------------------------------------------------------------- the script (no dvc run)
@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A bare git checkout holding only the script and the project's .gitignore (no ../shared beside it)."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / SCRIPT.name).write_bytes(SCRIPT.read_bytes())
    (root / ".gitignore").write_bytes((ROOT / ".gitignore").read_bytes())
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "script"], root)
    return root


def study(repo: Path, *args: str, check: bool = True):
    return run(["bash", "scripts/ktas-study.sh", "--dry-run", *args], repo, check=check)


def made_up_ktas(path: Path) -> Path:
    """Three invented visits in the KTAS layout: an ED, a GP and a HOME case."""
    return write_ktas(
        path, {}, {"KTAS_expert": "4", "KTAS_RN": "4", "Age": "30"}, {"KTAS_expert": "5", "KTAS_RN": "4", "Age": "25"}
    )


def test_the_script_refuses_without_data(repo: Path) -> None:
    refused = study(repo, check=False)
    assert refused.returncode == 1 and "no KTAS data given" in refused.stderr, refused.stderr
    assert "scripts/ktas-study.sh /path/to/data.csv" in refused.stderr
    assert not (repo / "data").exists() or not any((repo / "data").rglob("*.csv"))


def test_the_script_copies_the_file_and_runs_the_study_selection(repo: Path, tmp_path: Path) -> None:
    given = made_up_ktas(tmp_path / "mine.csv")
    out = study(repo, str(given)).stdout
    assert (repo / TARGET).read_bytes() == given.read_bytes()
    assert "3 visits; expert label ED 1, GP 1, HOME 1; nurse's level recorded for 3" in out, out
    command = out.split("running:", 1)[1]
    for override in (
        "data.source=ktas",
        f"data.path={TARGET}",
        "run.models=\\[smollm2-135m\\]",
        "run.bits=\\[4bit\\,8bit\\]",
        "run.configs=\\[medical_baseline\\,balanced_safe\\]",
        "lora.learning_rate=5.0e-4",  # the recipe that learns (docs/results.md)
        "train.label_weight=5.0",
    ):
        assert override in command, command
    assert "lora.iters" not in command  # the configs' own lengths
    # Never committed: git sees nothing new.
    assert run(["git", "status", "--porcelain"], repo).stdout == ""
    again = study(repo, str(given)).stdout
    assert "already holds this data" in again
    # A relative path is the caller's; the environment variable names the file too.
    relative = run(["bash", str(repo / "scripts/ktas-study.sh"), "--dry-run", "mine.csv"], tmp_path).stdout
    assert "already holds this data" in relative, relative
    env_run = run(["env", f"KTAS_CSV={given}", "bash", "scripts/ktas-study.sh", "--dry-run"], repo).stdout
    assert "already holds this data" in env_run


def test_the_script_never_overwrites_a_different_file(repo: Path, tmp_path: Path) -> None:
    theirs = repo / TARGET
    theirs.parent.mkdir(parents=True)
    theirs.write_text("the user's own file\n")
    refused = study(repo, str(made_up_ktas(tmp_path / "mine.csv")), check=False)
    assert refused.returncode == 1 and "exists and differs" in refused.stderr, refused.stderr
    assert "never overwrites" in refused.stderr
    assert theirs.read_text() == "the user's own file\n"
    # What the message suggests: a file already in data/raw/ktas/ is studied where it is.
    other = made_up_ktas(theirs.parent / "mine.csv")
    out = study(repo, "data/raw/ktas/mine.csv").stdout
    assert "using data/raw/ktas/mine.csv" in out and "data.path=data/raw/ktas/mine.csv" in out, out
    assert theirs.read_text() == "the user's own file\n" and other.is_file()


def test_the_script_refuses_when_the_data_would_not_be_git_ignored(repo: Path, tmp_path: Path) -> None:
    (repo / ".gitignore").write_text(
        "".join(line + "\n" for line in (ROOT / ".gitignore").read_text().splitlines() if "ktas" not in line)
    )
    refused = study(repo, str(made_up_ktas(tmp_path / "mine.csv")), check=False)
    assert refused.returncode == 1 and "not git-ignored" in refused.stderr, refused.stderr
    assert not (repo / TARGET).exists()


def test_the_script_takes_the_first_rows_and_bounds_a_tiny_run(repo: Path, tmp_path: Path) -> None:
    given = made_up_ktas(tmp_path / "mine.csv")
    out = study(repo, "--rows", "2", str(given)).stdout
    subset = repo / "data/raw/ktas/first-2.csv"
    assert subset.read_bytes().decode("cp1254").splitlines() == given.read_bytes().decode("cp1254").splitlines()[:3]
    assert "data.path=data/raw/ktas/first-2.csv" in out and not (repo / TARGET).exists()
    tiny = study(repo, "--tiny", str(given), check=False)
    assert tiny.returncode == 1 and "--rows 120" in tiny.stderr and "only 3 visits" in tiny.stderr
    bad = study(repo, "--rows", "0", str(given), check=False)
    assert bad.returncode == 1 and "positive whole number" in bad.stderr
    extra = study(repo, "--rows", "2", str(given), "--", "-S", "lora.iters=40").stdout
    assert "lora.iters=40" in extra.split("running:", 1)[1]


def test_the_script_stops_on_a_bad_file_naming_line_and_column(repo: Path, tmp_path: Path) -> None:
    bad = write_ktas(tmp_path / "bad.csv", {}, {**VISIT, NURSE_COLUMN: "9"})
    refused = study(repo, str(bad), check=False)
    assert refused.returncode == 1 and f"{bad}:3: field 'KTAS_RN'" in refused.stderr, refused.stderr
    assert not (repo / TARGET).exists()  # checked before anything is copied


# --------------------------------------------------------------------------- end to end on the real data
def first_rows(source: Path, target: Path, rows: int) -> list[dict[str, str]]:
    """Write the header and the first ``rows`` visits of ``source`` to ``target``; return them."""
    with source.open(encoding="cp1254", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=";")
        header, records = reader.fieldnames, [row for _, row in zip(range(rows), reader)]
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="cp1254", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, delimiter=";", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    return records


@pytest.fixture(scope="module")
def ktas_project(tmp_path_factory) -> tuple[Path, list[dict[str, str]], str]:
    if not KTAS_CSV.is_file():
        pytest.skip(f"KTAS data not found at {KTAS_CSV} (the public KTAS CSV of Moon et al. 2019; never committed)")
    project = make_project(tmp_path_factory.mktemp("ktas-project"), KTAS_PROFILE)
    records = first_rows(KTAS_CSV, project / TARGET, ROWS)
    repro = run(["dvc", "repro"], project)
    return project, records, repro.stdout + repro.stderr


@pytest.mark.e2e
def test_the_pipeline_runs_end_to_end_on_ktas(ktas_project, tmp_path: Path) -> None:
    project, records, repro = ktas_project
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["source"] == "ktas"

    # prepare wrote the three splits: every visit once, with the nurse's level and the vitals as attrs.
    splits = {name: read_examples(project / "data/prepared" / f"{name}.jsonl") for name in SPLITS}
    assert all(splits.values()), {name: len(cases) for name, cases in splits.items()}
    cases = {case.id: case for examples in splits.values() for case in examples}
    assert sorted(cases, key=lambda i: int(i.split("-")[1])) == [f"ktas-{n}" for n in range(1, ROWS + 1)]
    for number, record in enumerate(records, start=1):
        attrs = cases[f"ktas-{number}"].attrs
        assert attrs["nurse_label"] == NURSE_MAP[record[NURSE_COLUMN].strip()]
        assert attrs["vitals"] in {"abnormal", "normal", "missing"}

    # The prompts carry no KTAS_RN: they are exactly the notes of the same visits with that column removed.
    without = tmp_path / "without_rn.csv"
    with without.open("w", encoding="cp1254", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[c for c in records[0] if c != NURSE_COLUMN], delimiter=";")
        writer.writeheader()
        writer.writerows({k: v for k, v in record.items() if k != NURSE_COLUMN} for record in records)
    blind = {case.id: case.prompt for case in read_ktas_csv(without)}
    assert {i: case.prompt for i, case in cases.items()} == blind
    assert not any("KTAS" in case.prompt or "nurse_label" in case.prompt for case in cases.values())

    # Every stage ran here (the copied dvc.lock may hold other pipelines' stages), and the report has both runs.
    stages = {line.split()[0] for line in run(["dvc", "stage", "list"], project).stdout.splitlines() if line.strip()}
    per_run = {f"{stage}@{name}" for stage in ("train", "evaluate") for name in RUNS}
    assert {"prepare", "classical", "compare", *per_run} <= stages
    assert {stage for stage in stages if f"Running stage '{stage}'" not in repro} == set()
    assert stages <= set(yaml.safe_load((project / "dvc.lock").read_text())["stages"])
    study = json.loads((project / "reports/study.json").read_text())
    assert set(study["runs"]) == set(RUNS) and study["missing"] == []
    if "references" in stages:  # the nurses' row: every test case carries attrs.nurse_label
        assert (project / "metrics/references/nurses/evaluation.json").is_file()
    # The evaluation carries the attrs through to each case's row (the nurses' row and the vitals subgroup read them).
    predictions = [
        json.loads(line) for line in (project / f"metrics/runs/{RUNS[0]}/predictions.jsonl").read_text().splitlines()
    ]
    assert predictions and all(row["nurse_label"] == cases[row["id"]].attrs["nurse_label"] for row in predictions)
