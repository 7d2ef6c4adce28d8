"""The study summary: one row per run, the best runs, and a Markdown report for reviewers."""

from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from triage.config import RunSelection

HEADLINE = ("accuracy", "macro_f1", "ed_recall", "ed_f2", "ed_fnr", "ed_fn", "safe", "test_loss")


def expected_runs(selection: RunSelection) -> list[dict]:
    """Every run the selection asks for, in study order."""
    return [
        {"run": f"{model}-{bits}-{config}", "model": model, "bits": bits, "config": config}
        for model in selection.models for bits in selection.bits for config in selection.configs
    ]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect_rows(selection: RunSelection, runs_dir: Path, models_dir: Path) -> tuple[list[dict], list[str]]:
    """Rows of the evaluated runs and the names of selected runs that have no results."""
    rows, missing = [], []
    for run in expected_runs(selection):
        evaluation = _read(runs_dir / run["run"] / "eval.json")
        training = _read(runs_dir / run["run"] / "train.json")
        if evaluation is None or training is None:
            missing.append(run["run"])
            continue
        variant = _read(models_dir / f"{run['model']}-{run['bits']}.json") or {}
        rows.append({
            **run, "kind": training["kind"],
            **{key: evaluation[key] for key in HEADLINE},
            "gates_failed": [name for name, gate in evaluation["gates"].items() if gate["state"] != "pass"],
            "train_seconds": training["seconds"], "peak_memory_mb": training["peak_memory_mb"],
            "tokens_per_s": training["tokens_per_s"], "trainable_params": training["trainable_params"],
            "disk_mb": variant.get("disk_mb"), "source_precision": variant.get("source_precision"),
        })
    return rows, missing


def leaderboard_key(row: dict) -> tuple:
    """Safe runs first, then by ED F2, then accuracy (missing values sort last)."""
    return (not row["safe"], -(row["ed_f2"] or -1.0), -(row["accuracy"] or -1.0), row["run"])


def summary(rows: list[dict], missing: list[str], baselines: dict[str, dict]) -> dict:
    ranked = sorted(rows, key=leaderboard_key)
    safe = [row for row in ranked if row["safe"]]
    return {
        "n_runs": len(rows),
        "n_safe": len(safe),
        "best": ranked[0] if ranked else None,
        "best_safe": safe[0] if safe else None,
        "missing": missing,
        "runs": {row["run"]: row for row in rows},
        "baselines": baselines,
    }


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def report_markdown(study: dict) -> str:
    """The reviewer's report: leaderboard, baselines, missing runs."""
    ranked = sorted(study["runs"].values(), key=leaderboard_key)
    columns = ("run", "kind", *HEADLINE, "gates_failed")
    board = [[_fmt(", ".join(r[c]) or "-") if c == "gates_failed" else _fmt(r[c]) for c in columns] for r in ranked]
    parts = [
        "# Triage QLoRA study",
        f"{study['n_runs']} runs evaluated, {study['n_safe']} pass every safety gate "
        "(ED recall >= 95%, ED F2 >= 90%, ED FNR <= 5%). Decision rule and gates: params.yaml `evaluate`.",
        "## Leaderboard (safe first, then ED F2)",
        tabulate(board, headers=columns, tablefmt="github") if board else "No run has results yet.",
    ]
    if study["baselines"]:
        base = [[name, *(_fmt(b.get(k)) for k in HEADLINE)] for name, b in sorted(study["baselines"].items())]
        parts += ["## Zero-shot baselines (no adapter)", tabulate(base, headers=("variant", *HEADLINE), tablefmt="github")]
    if study["missing"]:
        parts += ["## Missing runs", "Selected in params.yaml `run:` but without results:",
                  "\n".join(f"- {name}" for name in study["missing"])]
    return "\n\n".join(parts) + "\n"
