"""The report's figures: Vega-Lite specifications with their data inline, rendered to SVG and PNG offline.

vl-convert-python renders Vega-Lite without a browser or network, from the same
grammar DVC's plots use, so a figure in ``reports/report.md`` and a page of
``dvc plots show`` are drawn by the same library.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from sklearn.metrics import roc_curve

from triage.evaluate.intervals import VERDICTS
from triage.report import by_condition
from triage.schema import LABELS

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
PANEL = 170  # pixels per small-multiple panel


def confusion_spec(predictions: dict[str, Sequence[dict]]) -> dict:
    """Confusion matrices as small multiples, in the order given (each run beside its zero-shot baseline)."""
    cells = [
        {
            "run": run,
            "label": label,
            "pred": pred,
            "cases": sum(1 for row in rows if row["label"] == label and row["pred"] == pred),
        }
        for run, rows in predictions.items()
        for label in LABELS
        for pred in LABELS
    ]
    square = {"field": "label", "type": "nominal", "sort": list(LABELS), "title": "true label"}
    return {
        "$schema": SCHEMA,
        "title": "Test-split confusion matrices (headline rule)",
        "data": {"values": cells},
        "facet": {"field": "run", "type": "nominal", "sort": list(predictions), "title": None},
        "columns": 2,
        "spec": {
            "width": PANEL,
            "height": PANEL,
            "layer": [
                {
                    "mark": "rect",
                    "encoding": {
                        "x": {"field": "pred", "type": "nominal", "sort": list(LABELS), "title": "answer"},
                        "y": square,
                        "color": {"field": "cases", "type": "quantitative", "scale": {"scheme": "blues"}},
                    },
                },
                {
                    "mark": {"type": "text", "fontSize": 13},
                    "encoding": {
                        "x": {"field": "pred", "type": "nominal", "sort": list(LABELS)},
                        "y": square,
                        "text": {"field": "cases", "type": "quantitative"},
                    },
                },
            ],
        },
    }


def roc_points(run: str, rows: Sequence[dict]) -> list[dict]:
    """ED recall against the share of non-ED cases sent to ED, as p(ED)'s threshold falls (sklearn's roc_curve)."""
    truth = [row["label"] == "ED" for row in rows]
    if all(truth) or not any(truth):
        return []
    fpr, tpr, _ = roc_curve(truth, [row["p_ED"] for row in rows])
    return [{"run": run, "over_triage": float(x), "ed_recall": float(y)} for x, y in zip(fpr, tpr)]


def roc_spec(predictions: dict[str, Sequence[dict]]) -> dict:
    """One panel per test condition, side by side."""
    points = [
        point | {"condition": condition}
        for run, rows in predictions.items()
        for condition, part in by_condition(rows).items()
        for point in roc_points(run, part)
    ]
    return {
        "$schema": SCHEMA,
        "title": "ED vs the rest: ED recall against over-triage to ED (test split)",
        "data": {"values": points},
        "facet": {"column": {"field": "condition", "type": "nominal", "title": "test condition"}},
        "spec": {
            "width": 300,
            "height": 260,
            "mark": {"type": "line", "interpolate": "step-after", "point": False},
            "encoding": {
                "x": {
                    "field": "over_triage",
                    "type": "quantitative",
                    "title": "non-ED cases sent to ED (false-positive rate)",
                },
                "y": {"field": "ed_recall", "type": "quantitative", "title": "ED recall"},
                "color": {"field": "run", "type": "nominal", "legend": {"labelLimit": 400}},
                "order": {"field": "over_triage"},
            },
        },
    }


def memory_spec(points: Sequence[dict]) -> dict:
    return {
        "$schema": SCHEMA,
        "title": "ED recall (test) against peak training memory",
        "width": 420,
        "height": 280,
        "data": {"values": list(points)},
        "mark": {"type": "point", "filled": True, "size": 80},
        "encoding": {
            "x": {
                "field": "peak_memory_mb",
                "type": "quantitative",
                "title": "peak training memory (MB)",
                "scale": {"zero": False},
            },
            "y": {"field": "ed_recall", "type": "quantitative", "title": "ED recall", "scale": {"domain": [0, 1]}},
            "color": {"field": "run", "type": "nominal", "legend": {"labelLimit": 400}},
        },
    }


def loss_spec(curves: Iterable[dict]) -> dict:
    """Rows ``{run, step, loss, split}``: train and validation loss per run, one panel per run."""
    return {
        "$schema": SCHEMA,
        "title": "Training and validation loss",
        "data": {"values": list(curves)},
        "facet": {"field": "run", "type": "nominal", "title": None},
        "columns": 2,
        "spec": {
            "width": 260,
            "height": 160,
            "mark": {"type": "line", "point": True},
            "encoding": {
                "x": {"field": "step", "type": "quantitative"},
                "y": {"field": "loss", "type": "quantitative", "title": "the run's objective"},
                "color": {"field": "split", "type": "nominal"},
            },
        },
    }


def uncertainty_spec(histograms: dict[str, Sequence[dict]]) -> dict:
    bins = [{"run": run, **row} for run, rows in histograms.items() for row in rows]
    return {
        "$schema": SCHEMA,
        "title": "MC-dropout uncertainty of the test cases (vote entropy, nats)",
        "data": {"values": bins},
        "facet": {"field": "run", "type": "nominal", "title": None},
        "columns": 2,
        "spec": {
            "width": 260,
            "height": 140,
            "mark": "bar",
            "encoding": {
                "x": {"field": "uncertainty", "type": "ordinal", "title": "vote entropy"},
                "y": {"field": "cases", "type": "quantitative"},
            },
        },
    }


def forest_spec(paired: Sequence[dict]) -> dict:
    """Each paired difference a - b with its 95% interval; a line at 0 (no difference)."""
    rows = [
        {
            "pair": f"{row['a']} - {row['b']}",
            "metric": row["metric"],
            "diff": row["diff"],
            "condition": row.get("condition", "all"),
            "low": row["low"],
            "high": row["high"],
            "verdict": row["verdict"],
        }
        for row in paired
        if row["diff"] is not None and row["low"] is not None
    ]
    y = {"field": "pair", "type": "nominal", "title": None, "axis": {"labelLimit": 520}}
    colour = {
        "field": "verdict",
        "type": "nominal",
        "scale": {"domain": list(VERDICTS), "range": ["#2a9d4a", "#d1495b", "#8d99ae"]},
    }
    return {
        "$schema": SCHEMA,
        "title": "Paired differences on the same test cases, with 95% intervals",
        "data": {"values": rows},
        "facet": {
            "row": {"field": "metric", "type": "nominal", "title": None},
            "column": {"field": "condition", "type": "nominal", "title": None},
        },
        "resolve": {"scale": {"y": "independent"}},
        "spec": {
            "width": 300,
            "layer": [
                {
                    "mark": "rule",
                    "encoding": {
                        "y": y,
                        "x": {"field": "low", "type": "quantitative", "title": "a - b"},
                        "x2": {"field": "high"},
                        "color": colour,
                    },
                },
                {
                    "mark": {"type": "point", "filled": True},
                    "encoding": {"y": y, "x": {"field": "diff", "type": "quantitative"}, "color": colour},
                },
                {"mark": {"type": "rule", "strokeDash": [4, 4]}, "encoding": {"x": {"datum": 0}}},
            ],
        },
    }


def render(spec: dict, directory: Path, name: str) -> str:
    """Write ``name``.svg and ``name``.png into ``directory``; return the PNG's file name for a Markdown link."""
    import vl_convert

    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.svg").write_text(vl_convert.vegalite_to_svg(spec), encoding="utf-8")
    (directory / f"{name}.png").write_bytes(vl_convert.vegalite_to_png(spec, scale=1.5))
    return f"{name}.png"


def curve_rows(run: str, log_dir: Path) -> list[dict]:
    """Train and validation loss of one run, from the DVCLive TSVs its training wrote."""
    import csv

    rows = []
    for split, path in (("train", "train/loss.tsv"), ("validation", "val/loss.tsv")):
        path = log_dir / "plots" / "metrics" / path
        if path.is_file():
            with path.open(encoding="utf-8") as handle:
                rows += [
                    {"run": run, "step": int(r["step"]), "loss": float(r["loss"]), "split": split}
                    for r in csv.DictReader(handle, delimiter="\t")
                ]
    return rows


def study_figures(
    directory: Path,
    predictions: dict[str, Sequence[dict]],
    memory: Sequence[dict],
    curves: Sequence[dict],
    histograms: dict[str, Sequence[dict]],
    paired: Sequence[dict],
) -> dict[str, str]:
    """Render every figure that has data into ``directory``; returns title -> file name, in report order."""
    figures = {
        "Confusion matrices, each run beside its zero-shot baseline": (confusion_spec(predictions), "confusion"),
        "ED recall against over-triage to ED (ROC of ED vs the rest)": (roc_spec(predictions), "ed_roc"),
        "ED recall against peak training memory": (memory_spec(memory), "ed_recall_vs_memory"),
        "Training and validation loss": (loss_spec(curves), "loss_curves"),
        "MC-dropout uncertainty": (uncertainty_spec(histograms), "mc_uncertainty"),
        "Paired differences (forest plot)": (forest_spec(paired), "paired_forest"),
    }
    return {title: render(spec, directory, name) for title, (spec, name) in figures.items() if spec["data"]["values"]}
