"""The study summary: one row per run, the best runs, and a Markdown report for reviewers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean
from typing import Sequence

import numpy as np
from tabulate import tabulate

from triage.config import RunSelection
from triage.io import iter_jsonl

HEADLINE = ("accuracy", "macro_f1", "ed_recall", "ed_f2", "ed_fnr", "ed_fn", "safe", "test_loss")
GATE_TEXT = {"ed_recall": "ED recall >= {:.0%}", "ed_f2": "ED F2 >= {:.0%}", "ed_fnr": "ED FNR <= {:.0%}"}


def expected_runs(selection: RunSelection) -> list[dict]:
    """Every run the selection asks for, in study order."""
    return [
        {"run": f"{model}-{bits}-{config}", "model": model, "bits": bits, "config": config}
        for model in selection.models for bits in selection.bits for config in selection.configs
    ]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect_rows(selection: RunSelection, runs_dir: Path, models_dir: Path,
                 baselines: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """Rows of the evaluated runs and the names of selected runs that have no results."""
    rows, missing = [], []
    for run in expected_runs(selection):
        evaluation = _read(runs_dir / run["run"] / "eval.json")
        training = _read(runs_dir / run["run"] / "train.json")
        if evaluation is None or training is None:
            missing.append(run["run"])
            continue
        variant = f"{run['model']}-{run['bits']}"
        facts = _read(models_dir / f"{variant}.json") or {}
        baseline = baselines.get(variant, {})
        rows.append({
            **run, "kind": training["kind"],
            **{key: evaluation[key] for key in HEADLINE},
            "gates": evaluation["gates"],
            "gain_accuracy": _delta(evaluation["accuracy"], baseline.get("accuracy")),
            "gain_ed_recall": _delta(evaluation["ed_recall"], baseline.get("ed_recall")),
            "train_seconds": training["seconds"], "peak_memory_mb": training["peak_memory_mb"],
            "tokens_per_s": training["tokens_per_s"], "trainable_params": training["trainable_params"],
            "disk_mb": facts.get("disk_mb"), "bits_per_weight": facts.get("bits_per_weight"),
            "source_precision": facts.get("source_precision"),
        })
    return rows, missing


def _delta(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def leaderboard_key(row: dict) -> tuple:
    """Safe runs first, then by ED F2, then accuracy (missing values sort last)."""
    return (not row["safe"], -(row["ed_f2"] or -1.0), -(row["accuracy"] or -1.0), row["run"])


def memory_points(rows: list[dict]) -> list[dict]:
    """One point per run for the ED recall vs peak memory plot."""
    return [{"run": r["run"], "peak_memory_mb": r["peak_memory_mb"], "ed_recall": r["ed_recall"]}
            for r in sorted(rows, key=lambda r: r["run"]) if r["ed_recall"] is not None]


def mc_uncertainties(predictions: Path) -> list[float]:
    """The MC-dropout vote entropy of every test case; empty when the run had no MC dropout."""
    if not predictions.is_file():
        return []
    return [row["mc_uncertainty"] for _, row in iter_jsonl(predictions) if "mc_uncertainty" in row]


def uncertainty_histogram(uncertainties: Sequence[float], width: float = 0.1) -> list[dict]:
    """Cases per bin of vote entropy (nats, 0 to ln 3); every bin is listed so runs line up."""
    edges = np.arange(math.ceil(math.log(3) / width) + 1) * width
    counts, _ = np.histogram(np.asarray(uncertainties, dtype=float), bins=edges)
    return [{"uncertainty": f"{low:.1f}-{low + width:.1f}", "cases": int(n)} for low, n in zip(edges, counts)]


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


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _table(rows: list[list], headers: tuple[str, ...]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github")


def failed_gates(row: dict) -> str:
    """The gates a run misses and by how much, e.g. 'ED recall 0.917 (needs >= 0.95, short by 0.033)'."""
    parts = []
    for name, gate in row["gates"].items():
        if gate["state"] == "pass":
            continue
        if gate["value"] is None:
            parts.append(f"{name} n/a")
        else:
            parts.append(f"{name} {gate['value']:.3f} (short by {abs(gate['margin']):.3f})")
    return "; ".join(parts) or "-"


def _leaderboard(ranked: list[dict]) -> str:
    columns = ("run", "kind", "accuracy", "macro_f1", "ed_recall", "ed_f2", "ed_fnr", "ed_fn", "safe", "test_loss")
    rows = [[_fmt(r[c]) for c in columns] + [failed_gates(r)] for r in ranked]
    return _table(rows, (*columns, "gates failed (by how much)"))


def _bits_comparison(rows: list[dict]) -> str | None:
    by_key = {(r["model"], r["config"], r["bits"]): r for r in rows}
    lines = []
    for (model, config, bits), low in sorted(by_key.items()):
        high = by_key.get((model, config, "8bit"))
        if bits != "4bit" or high is None:
            continue
        lines.append([f"{model} / {config}"] + [
            f"{_fmt(low[k])} vs {_fmt(high[k])} ({_signed(_delta(low[k], high[k]))})"
            for k in ("accuracy", "ed_recall", "disk_mb", "peak_memory_mb", "tokens_per_s")
        ])
    if not lines:
        return None
    return _table(lines, ("model / config", "accuracy 4 vs 8", "ED recall", "MB on disk", "peak MB", "tokens/s"))


def _kinds_comparison(rows: list[dict]) -> str | None:
    kinds = sorted({r["kind"] for r in rows})
    if len(kinds) < 2:
        return None
    keys = ("accuracy", "macro_f1", "ed_recall", "ed_f2", "ed_fnr")
    lines = []
    for kind in kinds:
        members = [r for r in rows if r["kind"] == kind]
        means = [mean(r[k] for r in members if r[k] is not None) if any(r[k] is not None for r in members) else None
                 for k in keys]
        lines.append([kind, len(members), *(_fmt(m) for m in means), sum(r["safe"] for r in members)])
    return _table(lines, ("kind", "runs", *(f"mean {k}" for k in keys), "safe runs"))


def _baseline_comparison(rows: list[dict], baselines: dict[str, dict]) -> str | None:
    if not baselines:
        return None
    lines = []
    for r in sorted(rows, key=lambda r: r["run"]):
        baseline = baselines.get(f"{r['model']}-{r['bits']}", {})
        lines.append([r["run"], _fmt(baseline.get("accuracy")), _fmt(r["accuracy"]), _signed(r["gain_accuracy"]),
                      _signed(r["gain_ed_recall"]), _fmt(baseline.get("test_loss")), _fmt(r["test_loss"])])
    return _table(lines, ("run", "zero-shot accuracy", "fine-tuned accuracy", "gain", "ED recall gain",
                          "zero-shot test loss", "fine-tuned test loss"))


def _sources(rows: list[dict]) -> str | None:
    seen = {(r["model"], r["bits"]): r for r in rows}
    lines = [[f"{m}-{b}", _fmt(r["source_precision"]), _fmt(r["bits_per_weight"]), _fmt(r["disk_mb"])]
             for (m, b), r in sorted(seen.items())]
    return _table(lines, ("variant", "source precision", "bits/weight", "MB on disk")) if lines else None


def report_markdown(study: dict, gates: dict[str, float]) -> str:
    """The reviewer's report: leaderboard, 4 vs 8 bit, standard vs safety, baselines, sources, missing runs."""
    rows = list(study["runs"].values())
    ranked = sorted(rows, key=leaderboard_key)
    gate_text = ", ".join(GATE_TEXT[k].format(gates[k]) for k in GATE_TEXT)
    parts = [
        "# Triage QLoRA study",
        f"{study['n_runs']} runs evaluated, {study['n_safe']} pass every safety gate ({gate_text}). "
        "Not for clinical use.",
        "## Leaderboard (safe first, then ED F2)",
        _leaderboard(ranked) if ranked else "No run has results yet.",
    ]
    sections = [
        ("4-bit vs 8-bit (same model and config; delta = 4-bit minus 8-bit)", _bits_comparison(rows)),
        ("Standard vs safety-enhanced configs", _kinds_comparison(rows)),
        ("Zero-shot baseline vs fine-tuned", _baseline_comparison(rows, study["baselines"])),
        ("Model variants and their source precision", _sources(rows)),
    ]
    parts += [text for title, table in sections if table for text in (f"## {title}", table)]
    if any(str(r["source_precision"] or "").startswith("Q") for r in rows):
        parts.append("A quantized GGUF source caps every variant made from it: its 8-bit variant "
                     "cannot be better than the source precision listed above.")
    if study["missing"]:
        parts += ["## Missing runs", "Selected in params.yaml `run:` but without results:",
                  "\n".join(f"- {name}" for name in study["missing"])]
    return "\n\n".join(parts) + "\n"
