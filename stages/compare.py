"""Collect every selected run into the study file, its compact metrics/summary.json, a Markdown report and plot data.

dvc repro compare
"""

import argparse
import json
import os
from pathlib import Path

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from triage.config import load_params
from triage.figures import curve_rows, study_figures
from triage.io import atomic_write_text, staged_directory, write_json
from triage.report import (
    baseline_name,
    collect_rows,
    comparison_pairs,
    headline_summary,
    learner_row,
    mc_uncertainties,
    memory_points,
    paired_rows,
    read_case_predictions,
    report_markdown,
    summary,
    uncertainty_histogram,
)
from triage.stage import run_stage


def read_variants(directory: Path, models: list[str], bits: list[str]) -> dict[str, dict]:
    """The rows of a per-variant stage (zero-shot baselines, linear probes) that have results, by variant."""
    found = {}
    for variant in (f"{m}-{b}" for m in models for b in bits):
        path = directory / variant / "evaluation.json"
        if path.is_file():
            found[variant] = learner_row(json.loads(path.read_text()))
    return found


def read_learners(directory: Path) -> dict[str, tuple[dict, Path]]:
    """Each sub-folder's row and predictions file (the reference rules), by the learner's name."""
    found = {}
    for path in sorted(directory.glob("*/evaluation.json")):
        row = learner_row(json.loads(path.read_text()))
        found[row["run"]] = (row, path.parent / "predictions.jsonl")
    return found


def uncertainty_histograms(runs: Path, rows: list[dict]) -> dict[str, list[dict]]:
    """The MC-dropout vote-entropy histogram of each run evaluated with MC dropout."""
    return {
        row["run"]: uncertainty_histogram(values)
        for row in rows
        if (values := mc_uncertainties(runs / row["run"] / "predictions.jsonl"))
    }


def write_uncertainty_plots(directory: Path, histograms: dict[str, list[dict]]) -> None:
    """One histogram per run evaluated with MC dropout, named after the run."""
    with staged_directory(directory) as staged:
        staged.mkdir(parents=True)
        for run, histogram in histograms.items():
            write_json(staged / f"{run}.json", histogram)


def figure_order(rows: list[dict], contenders: dict[str, Path]) -> list[str]:
    """Each run followed by its zero-shot baseline, then whatever else was compared (the classical floor)."""
    order = []
    for row in sorted(rows, key=lambda r: r["run"]):
        order += [name for name in (row["run"], baseline_name(row["model"], row["bits"])) if name not in order]
    return order + [name for name in contenders if name not in order]


def write_figures(
    directory: Path,
    runs: Path,
    rows: list[dict],
    contenders: dict[str, Path],
    histograms: dict[str, list[dict]],
    paired: list[dict],
) -> dict[str, str]:
    predictions = {
        name: list(read_case_predictions(contenders[name]).values())
        for name in figure_order(rows, contenders)
        if name in contenders
    }
    curves = [point for row in rows for point in curve_rows(row["run"], runs / row["run"] / "dvclive")]
    with staged_directory(directory) as staged:
        return study_figures(staged, predictions, memory_points(rows), curves, histograms, paired)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--baselines", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument(
        "--classical", type=Path, required=True, help="the classical baseline's eval.json and predictions"
    )
    parser.add_argument("--probes", type=Path, required=True, help="one folder per variant: the linear probe's results")
    parser.add_argument("--references", type=Path, required=True, help="one folder per reference rule")
    parser.add_argument("--summary", type=Path, required=True, help="compact summary.json for dvc metrics")
    parser.add_argument("--study", type=Path, required=True, help="the whole study the report is made from")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--memory-plot", type=Path, required=True)
    parser.add_argument("--uncertainty-plots", type=Path, required=True)
    parser.add_argument("--figures", type=Path, required=True, help="directory for the report's PNG and SVG figures")
    args = parser.parse_args()

    params = load_params()
    baselines = read_variants(args.baselines, params.run.models, params.run.bits)
    rows, missing = collect_rows(params.run, args.runs, args.models, baselines)
    contenders = {row["run"]: args.runs / row["run"] / "predictions.jsonl" for row in rows}
    contenders |= {
        baseline_name(*variant.rsplit("-", 1)): args.baselines / variant / "predictions.jsonl" for variant in baselines
    }
    classical = args.classical / "evaluation.json"
    floors = [learner_row(json.loads(classical.read_text()))] if classical.is_file() else []
    contenders |= {floor["run"]: args.classical / "predictions.jsonl" for floor in floors}
    probes = read_variants(args.probes, params.run.models, params.run.bits)
    floors += list(probes.values())
    contenders |= {probe["run"]: args.probes / variant / "predictions.jsonl" for variant, probe in probes.items()}
    references = read_learners(args.references)
    pairs = comparison_pairs(rows, baselines, [floor["run"] for floor in floors])
    study = summary(
        rows, missing, baselines, paired_rows(pairs, contenders), floors, [row for row, _ in references.values()]
    )
    write_json(args.study, study)
    write_json(args.summary, headline_summary(study))
    write_json(args.memory_plot, memory_points(rows))
    histograms = uncertainty_histograms(args.runs, rows)
    write_uncertainty_plots(args.uncertainty_plots, histograms)
    gates = {
        "ed_recall": params.evaluate.gates.ed_recall_min,
        "ed_f2": params.evaluate.gates.ed_f2_min,
        "ed_fnr": params.evaluate.gates.ed_fnr_max,
    }
    figures = write_figures(args.figures, args.runs, rows, contenders, histograms, study["paired"])
    links = Path(os.path.relpath(args.figures, args.report.parent))
    report = report_markdown(study, gates, {title: f"{links.as_posix()}/{name}" for title, name in figures.items()})
    atomic_write_text(args.report, report)
    print(report)


if __name__ == "__main__":
    run_stage(main, "compare")
