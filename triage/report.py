"""The study summary: one row per run, the best runs, paired comparisons and a Markdown report.

Runs are ranked and the best ones chosen on their validation-split metrics;
the test split's metrics are reported beside them and never used to choose,
so the published winner's test numbers are not the maximum of many noisy ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from statistics import mean

import numpy as np
from tabulate import tabulate

from triage.config import RunSelection
from triage.evaluate import intervals
from triage.evaluate.metrics import RUN_HEADLINE
from triage.io import iter_jsonl

SELECTION = ("accuracy", "macro_f1", "ed_recall", "ed_f2", "ed_fnr", "ed_auroc", "safe", "constant")
"""The validation-split metrics each row carries for ranking and choosing."""
SELECTION_CONDITION = "wording"
SELECTION_REASON = (
    "training's complaints in phrasings it never saw, the condition where what a run learned from its own "
    "training can show; validation's complaint part holds about 20-30 presentation groups, too few to rank "
    "runs on"
)
CONDITION_KEYS = (
    "accuracy",
    "macro_f1",
    "ed_recall",
    "ed_f2",
    "ed_auroc",
    "under_triage_rate",
    "n_cases",
    "constant",
    "answers",
)
"""What each row carries of each test condition; ``ci95`` adds accuracy's, ED recall's and ED AUROC's interval."""
CONDITION_INTERVALS = ("accuracy", "ed_recall", "ed_auroc")
RANKED_ON = ("ed_f2", "accuracy")
"""After the gates, the validation metrics runs are ranked on; a constant rule must not match a chosen run on them."""
ZERO_SHOT = "zero_shot"
GATE_TEXT = {"ed_recall": "ED recall >= {:.0%}", "ed_f2": "ED F2 >= {:.0%}", "ed_fnr": "ED FNR <= {:.0%}"}


def expected_runs(selection: RunSelection) -> list[dict]:
    """Every run the selection asks for, in study order."""
    return [
        {"run": f"{model}-{bits}-{config}", "model": model, "bits": bits, "config": config}
        for model in selection.models
        for bits in selection.bits
        for config in selection.configs
    ]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def condition_rows(evaluation: dict) -> dict[str, dict]:
    """Each test condition's numbers with their intervals (empty for data without conditions)."""
    return {
        name: {key: condition[key] for key in CONDITION_KEYS}
        | {"ci95": {key: condition["ci95"][key] for key in CONDITION_INTERVALS}}
        for name, condition in evaluation.get("conditions", {}).items()
    }


def valid_row(evaluation: dict) -> dict:
    """The validation metrics a learner is ranked on: its wording part when the data have conditions."""
    valid = evaluation["valid"]
    conditions = valid.get("conditions", {})
    chosen = conditions.get(SELECTION_CONDITION, valid)
    return {key: chosen[key] for key in SELECTION} | {
        "condition": SELECTION_CONDITION if SELECTION_CONDITION in conditions else "all",
        "conditions": {name: {key: c[key] for key in SELECTION} for name, c in conditions.items()},
    }


def learner_row(evaluation: dict) -> dict:
    """What every learner's row holds, fine-tuned or not: test headline, intervals, answers, conditions, valid."""
    return {
        "run": evaluation["run"],
        **{key: evaluation[key] for key in RUN_HEADLINE},
        "ci95": evaluation["ci95"],
        "answers": evaluation["answers"],
        "constant": evaluation["constant"],
        "conditions": condition_rows(evaluation),
        "valid": valid_row(evaluation),
    }


def collect_rows(
    selection: RunSelection, runs_dir: Path, models_dir: Path, baselines: dict[str, dict]
) -> tuple[list[dict], list[str]]:
    """Rows of the evaluated runs and the names of selected runs that have no results."""
    rows, missing = [], []
    for run in expected_runs(selection):
        evaluation = _read(runs_dir / run["run"] / "evaluation.json")
        training = _read(runs_dir / run["run"] / "train.json")
        if evaluation is None or training is None:
            missing.append(run["run"])
            continue
        variant = f"{run['model']}-{run['bits']}"
        facts = _read(models_dir / f"{variant}.json") or {}
        baseline = baselines.get(variant, {})
        rows.append(
            {
                **learner_row(evaluation),
                **run,
                "kind": training["kind"],
                "gates": evaluation["gates"],
                "train_accuracy": training["final_train_accuracy"],
                "gain_accuracy": _delta(evaluation["accuracy"], baseline.get("accuracy")),
                "gain_ed_recall": _delta(evaluation["ed_recall"], baseline.get("ed_recall")),
                "train_seconds": training["seconds"],
                "peak_memory_mb": training["peak_memory_mb"],
                "tokens_per_s": training["tokens_per_s"],
                "trainable_params": training["trainable_params"],
                "disk_mb": facts.get("disk_mb"),
                "bits_per_weight": facts.get("bits_per_weight"),
                "source_precision": facts.get("source_precision"),
            }
        )
    return rows, missing


def _delta(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def leaderboard_key(row: dict) -> tuple:
    """On the validation split: safe runs first, then by ED F2, then accuracy (missing values sort last)."""
    valid = row["valid"]
    return (not valid["safe"], *(-(valid[key] or -1.0) for key in RANKED_ON), row["run"])


def exclusion(row: dict, references: Sequence[dict]) -> str | None:
    """Why a run cannot be chosen: it answers one label throughout, or a constant rule matches it on validation."""
    valid = row["valid"]
    if valid["constant"]:
        return "answers one label to every validation case"
    for reference in references:
        for key in RANKED_ON:
            mine, theirs = valid[key], reference["valid"][key]
            if theirs is not None and (mine is None or mine <= theirs):
                return f"{reference['run']} matches it on validation {key} ({_fmt(mine)} vs {_fmt(theirs)})"
    return None


def memory_points(rows: list[dict]) -> list[dict]:
    """One point per run for the ED recall vs peak memory plot."""
    return [
        {"run": r["run"], "peak_memory_mb": r["peak_memory_mb"], "ed_recall": r["ed_recall"]}
        for r in sorted(rows, key=lambda r: r["run"])
        if r["ed_recall"] is not None
    ]


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


def baseline_name(model: str, bits: str) -> str:
    """The zero-shot baseline's name in paired comparisons, as the baseline stage names its run."""
    return f"{model}-{bits}-{ZERO_SHOT}"


def probe_name(model: str, bits: str) -> str:
    """The linear probe on a variant's frozen features, as the probe stage names it."""
    return f"{model}-{bits}-probe"


def comparison_pairs(rows: list[dict], baselines: dict[str, dict], floors: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(a, b) pairs compared on the same test cases, a over b.

    Each fine-tuned run against its variant's zero-shot baseline and against
    every floor (the classical baseline; a linear probe only for its own
    variant), then 4-bit against 8-bit of the same model and config
    (zero-shot included). Another kind of run joins by adding its pairs here
    and its predictions file to the contenders the compare stage passes to
    ``paired_rows``.
    """
    ordered = sorted(rows, key=lambda r: r["run"])
    pairs = [
        (r["run"], baseline_name(r["model"], r["bits"])) for r in ordered if f"{r['model']}-{r['bits']}" in baselines
    ]
    pairs += [
        (r["run"], floor)
        for floor in floors
        for r in ordered
        if not floor.endswith("-probe") or floor == probe_name(r["model"], r["bits"])
    ]
    configs = {(r["model"], r["config"]): {} for r in rows}
    for r in rows:
        configs[(r["model"], r["config"])][r["bits"]] = r["run"]
    for model in sorted({r["model"] for r in rows}):
        if {f"{model}-4bit", f"{model}-8bit"} <= set(baselines):
            configs[(model, ZERO_SHOT)] = {bits: baseline_name(model, bits) for bits in ("4bit", "8bit")}
    pairs += [(names["4bit"], names["8bit"]) for _, names in sorted(configs.items()) if {"4bit", "8bit"} <= set(names)]
    return pairs


def read_case_predictions(path: Path) -> dict[str, dict]:
    """A run's predictions.jsonl by case id: label, presentation group, headline decision and p(ED)."""
    return {row["id"]: row for _, row in iter_jsonl(path)}


def paired_rows(pairs: list[tuple[str, str]], contenders: dict[str, Path]) -> list[dict]:
    """``{a, b, metric, diff, low, high, p_value, verdict}`` for every pair whose predictions exist.

    ``contenders`` maps a name to its predictions file. The two runs must have
    scored the same cases (the same test split), else the comparison is not paired.
    """
    cache: dict[str, dict[str, dict]] = {}
    out = []
    for a, b in pairs:
        if not (contenders.get(a) and contenders[a].is_file() and contenders.get(b) and contenders[b].is_file()):
            continue
        left, right = (cache.setdefault(name, read_case_predictions(contenders[name])) for name in (a, b))
        if set(left) != set(right):
            raise ValueError(
                f"{contenders[a]} and {contenders[b]} hold different cases: "
                "re-run both evaluations on the same test split"
            )
        for condition, part in by_condition(list(left.values())).items():
            ids = [row["id"] for row in part]
            labels = [left[i]["label"] for i in ids]
            groups = [left[i].get("group", "") for i in ids]
            runs = [([side[i]["pred"] for i in ids], [side[i]["p_ED"] for i in ids]) for side in (left, right)]
            out += [
                {"a": a, "b": b, "condition": condition, **row}
                for row in intervals.paired_comparison(labels, groups, *runs)
            ]
    return out


def by_condition(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Prediction rows per test condition ("all" for data without conditions), for the paired rows and figures."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row.get("condition", "all"), []).append(row)
    return dict(sorted(out.items()))


def summary(
    rows: list[dict],
    missing: list[str],
    baselines: dict[str, dict],
    paired: list[dict],
    floors: Sequence[dict] = (),
    references: Sequence[dict] = (),
) -> dict:
    """The study's summary.json; ``best``/``best_safe`` are chosen on the validation split.

    A run that answers one label throughout, or that a constant reference rule
    matches on a ranking metric, is never chosen; the reason is kept on its row.
    """
    constant_rules = [row for row in references if row["constant"]]
    rows = [row | {"excluded": exclusion(row, constant_rules)} for row in rows]
    ranked = sorted(rows, key=leaderboard_key)
    eligible = [row for row in ranked if row["excluded"] is None]
    safe = [row for row in eligible if row["valid"]["safe"]]
    condition = rows[0]["valid"]["condition"] if rows else None
    return {
        "n_runs": len(rows),
        "n_safe": sum(row["safe"] for row in rows),
        "n_safe_on_valid": sum(row["valid"]["safe"] for row in rows),
        "selection": {
            "split": "valid",
            "condition": condition,
            "ranked_on": ["safe", *RANKED_ON],
            "why": SELECTION_REASON if condition == SELECTION_CONDITION else "the data have one test condition",
            "excluded": {row["run"]: row["excluded"] for row in rows if row["excluded"]},
        },
        "best": {**eligible[0], "selected_on": "valid"} if eligible else None,
        "best_safe": {**safe[0], "selected_on": "valid"} if safe else None,
        "missing": missing,
        "runs": {row["run"]: row for row in rows},
        "baselines": baselines,
        "classical": {row["run"]: row for row in floors},
        "references": {row["run"]: row for row in references},
        "paired": paired,
    }


def headline_summary(study: dict) -> dict:
    """The compact summary.json for ``dvc metrics``: counts, the best run (chosen on valid) and how it
    compares with its zero-shot baseline and the floors on test, per test condition. The whole study,
    every run and every paired row, is in the full study file the report is made from."""
    best = study["best"]
    compact = {
        "n_runs": study["n_runs"],
        "n_safe": study["n_safe"],
        "n_safe_on_valid": study["n_safe_on_valid"],
        "n_missing": len(study["missing"]),
        "best": best["run"] if best else None,
    }
    if best:
        compact["best_test"] = {key: best[key] for key in ("accuracy", "ed_recall", "ed_auroc")} | {
            "safe": int(best["safe"])
        }
        compact["best_test"] |= {
            name: {key: condition[key] for key in CONDITION_INTERVALS} for name, condition in best["conditions"].items()
        }
        floors = set(study.get("classical", {}))
        for row in study["paired"]:
            if (
                row["a"] == best["run"]
                and row["metric"] in ("accuracy", "ed_auroc")
                and (row["b"].endswith(ZERO_SHOT) or row["b"] in floors)
            ):
                against = "vs_zero_shot" if row["b"].endswith(ZERO_SHOT) else f"vs_{row['b']}"
                compact.setdefault(f"best_{against}", {}).setdefault(row["condition"], {})[row["metric"]] = {
                    key: row[key] for key in ("diff", "low", "high")
                }
    return compact


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


def _with_interval(value: float | None, interval: dict | None) -> str:
    if value is None or not interval or interval["low"] is None:
        return _fmt(value)
    return f"{value:.3f} [{interval['low']:.2f}, {interval['high']:.2f}]"


def _answers(row: dict) -> str:
    """The labels a learner answered on test, with "constant" when it gave one answer to every case."""
    counts = "/".join(str(row["answers"].get(label, 0)) for label in ("ED", "GP", "HOME"))
    return f"constant ({counts})" if row["constant"] else counts


FITS_TRAINING = 0.9
"""Below this argmax accuracy on its own training sample a run has not fitted its data: a defect, not a finding."""


def _train_fit(accuracy: float | None) -> str:
    if accuracy is None:
        return "n/a"
    return f"{accuracy:.3f}" + (" (not fitted)" if accuracy < FITS_TRAINING else "")


def _leaderboard(ranked: list[dict]) -> str:
    chosen_on = ("ed_f2", "accuracy", "ed_recall", "safe")
    condition = ranked[0]["valid"]["condition"] if ranked else "all"
    rows = [
        [
            r["run"],
            r["kind"],
            *(_fmt(r["valid"][c]) for c in chosen_on),
            _train_fit(r["train_accuracy"]),
            *(
                _with_interval(r[c], r["ci95"].get(c))
                for c in ("accuracy", "macro_f1", "ed_recall", "ed_f2", "ed_auroc")
            ),
            _fmt(r["under_triage_rate"]),
            _fmt(r["unsafe_rate"]),
            _fmt(r["safe"]),
            _answers(r),
            failed_gates(r),
            r.get("excluded") or "-",
        ]
        for r in ranked
    ]
    headers = (
        "run",
        "kind",
        *(f"valid {condition} {c}" for c in chosen_on),
        "train accuracy",
        "test accuracy",
        "macro_f1",
        "ed_recall",
        "ed_f2",
        "ed_auroc",
        "under-triage",
        "unsafe",
        "safe",
        "test answers ED/GP/HOME",
        "test gates failed (by how much)",
        "not eligible because",
    )
    return _table(rows, headers)


def _conditions_table(study: dict) -> str | None:
    """Every learner on each test condition side by side, constant references included."""
    kinds = (("runs", "fine-tuned"), ("baselines", "zero-shot"), ("classical", "floor"), ("references", "reference"))
    learners = [
        (kind, row) for key, kind in kinds for row in sorted(study.get(key, {}).values(), key=lambda r: r["run"])
    ]
    names = sorted({name for _, row in learners for name in row.get("conditions", {})})
    if not names:
        return None
    lines = [
        [row["run"], kind, *(cell for name in names for cell in _condition_cells(row["conditions"].get(name)))]
        for kind, row in learners
    ]
    headers = (
        "learner",
        "kind",
        *(
            f"{name} {column}"
            for name in names
            for column in ("accuracy", "ED recall", "ED AUROC", "answers ED/GP/HOME")
        ),
    )
    return _table(lines, headers)


def _condition_cells(condition: dict | None) -> list[str]:
    if condition is None:
        return ["n/a"] * 4
    return [
        *(_with_interval(condition[key], condition["ci95"][key]) for key in CONDITION_INTERVALS),
        _answers(condition),
    ]


def _paired_table(paired: list[dict]) -> str | None:
    if not paired:
        return None
    lines = [
        [
            p["a"],
            p["b"],
            p["condition"],
            p["metric"],
            _signed(p["diff"]),
            "n/a"
            if p["low"] is None
            else f"[{p['low']:+.3f}, {p['high']:+.3f}]" + (" (approx.)" if p["interval_approximate"] else ""),
            f"{p['test']}, {p['groups']} groups" + ("" if p["p_groups"] is None else f", p = {p['p_groups']:.3g}"),
            "-" if p["p_value"] is None else f"{p['p_value']:.3g}",
            p["verdict"] + (f" ({p['note']})" if p["note"] else ""),
        ]
        for p in paired
    ]
    return _table(
        lines, ("a", "b", "condition", "metric", "a - b", "95% interval", "deciding test", "McNemar p", "verdict")
    )


def _bits_comparison(rows: list[dict]) -> str | None:
    by_key = {(r["model"], r["config"], r["bits"]): r for r in rows}
    lines = []
    for (model, config, bits), low in sorted(by_key.items()):
        high = by_key.get((model, config, "8bit"))
        if bits != "4bit" or high is None:
            continue
        lines.append(
            [f"{model} / {config}"]
            + [
                f"{_fmt(low[k])} vs {_fmt(high[k])} ({_signed(_delta(low[k], high[k]))})"
                for k in ("accuracy", "ed_recall", "disk_mb", "peak_memory_mb", "tokens_per_s")
            ]
        )
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
        means = [
            mean(r[k] for r in members if r[k] is not None) if any(r[k] is not None for r in members) else None
            for k in keys
        ]
        lines.append([kind, len(members), *(_fmt(m) for m in means), sum(r["safe"] for r in members)])
    return _table(lines, ("kind", "runs", *(f"mean {k}" for k in keys), "safe runs"))


def _baseline_comparison(rows: list[dict], baselines: dict[str, dict]) -> str | None:
    if not baselines:
        return None
    lines = []
    for r in sorted(rows, key=lambda r: r["run"]):
        baseline = baselines.get(f"{r['model']}-{r['bits']}", {})
        lines.append(
            [
                r["run"],
                _fmt(baseline.get("accuracy")),
                _fmt(r["accuracy"]),
                _signed(r["gain_accuracy"]),
                _signed(r["gain_ed_recall"]),
                _fmt(baseline.get("test_loss")),
                _fmt(r["test_loss"]),
            ]
        )
    return _table(
        lines,
        (
            "run",
            "zero-shot accuracy",
            "fine-tuned accuracy",
            "gain",
            "ED recall gain",
            "zero-shot test loss",
            "fine-tuned test loss",
        ),
    )


def _floors(floors: dict[str, dict]) -> str | None:
    if not floors:
        return None
    lines = [
        [
            f["run"],
            _fmt(f["valid"]["accuracy"]),
            _fmt(f["valid"]["ed_auroc"]),
            *(_with_interval(f[c], f["ci95"].get(c)) for c in ("accuracy", "macro_f1", "ed_recall", "ed_auroc")),
            _fmt(f["under_triage_rate"]),
            _fmt(f["unsafe_rate"]),
            _answers(f),
        ]
        for f in floors.values()
    ]
    return _table(
        lines,
        (
            "learner",
            "valid accuracy",
            "valid ed_auroc",
            "test accuracy",
            "macro_f1",
            "ed_recall",
            "ed_auroc",
            "under-triage",
            "unsafe",
            "answers ED/GP/HOME",
        ),
    )


def _sources(rows: list[dict]) -> str | None:
    seen = {(r["model"], r["bits"]): r for r in rows}
    lines = [
        [f"{m}-{b}", _fmt(r["source_precision"]), _fmt(r["bits_per_weight"]), _fmt(r["disk_mb"])]
        for (m, b), r in sorted(seen.items())
    ]
    return _table(lines, ("variant", "source precision", "bits/weight", "MB on disk")) if lines else None


def _selection_text(study: dict) -> str:
    selection = study.get("selection")
    if not selection:
        return ""
    text = f"Runs are chosen on the validation split's `{selection['condition']}` cases: {selection['why']}."
    best = study["best"]
    text += f" Chosen: `{best['run']}`." if best else " No run is eligible, so none is chosen."
    floors = set(study.get("classical", {}))
    verdicts = [
        f"vs `{row['b']}` on {row['condition']} {row['metric']}: {_signed(row['diff'])} "
        f"[{_signed(row['low'])}, {_signed(row['high'])}], {row['verdict']}"
        for row in study["paired"]
        if best
        and row["a"] == best["run"]
        and row["b"] in floors
        and row["metric"] in ("accuracy", "ed_auroc")
        and row["condition"] in (selection["condition"], "all")
    ]
    if verdicts:
        text += " On test, the chosen run " + "; ".join(verdicts) + "."
    if selection["excluded"]:
        text += " Not eligible: " + "; ".join(f"`{run}` ({why})" for run, why in selection["excluded"].items()) + "."
    return text


def report_markdown(study: dict, gates: dict[str, float], figures: dict[str, str] | None = None) -> str:
    """The reviewer's report: leaderboard, 4 vs 8 bit, standard vs safety, baselines, sources, missing runs."""
    rows = list(study["runs"].values())
    ranked = sorted(rows, key=leaderboard_key)
    gate_text = ", ".join(GATE_TEXT[k].format(gates[k]) for k in GATE_TEXT)
    parts = [
        "# Triage QLoRA study",
        f"{study['n_runs']} runs evaluated, {study['n_safe']} pass every safety gate on the test split "
        f"({gate_text}); {study['n_safe_on_valid']} on the validation split. Not for clinical use.",
        _selection_text(study),
        "## Leaderboard",
        "Ranked on the validation split (safe first, then ED F2, then accuracy); the test split's "
        "metrics are beside them, with 95% intervals (ED recall exact, the others a bootstrap over "
        "presentation groups), and never used to choose. Train accuracy is the argmax accuracy on a fixed "
        'sample of the run\'s own training cases; under 0.9 the run has not fitted its data ("not fitted").',
        _leaderboard(ranked) if ranked else "No run has results yet.",
    ]
    conditions = _conditions_table(study)
    if conditions:
        parts += [
            "## Test conditions side by side",
            "`wording`: training's complaints in phrasings it never saw (did fine-tuning learn the rules?). "
            "`complaint`: presentations training never saw (does the model bring knowledge of its own?). "
            "Test split, argmax answers, 95% intervals as in the leaderboard.",
            conditions,
        ]
    paired = _paired_table(study["paired"])
    if paired:
        parts += [
            "## Paired comparisons (same test cases)",
            "a minus b per test condition. With 30 or more presentation groups a paired bootstrap over "
            "groups decides; with fewer its interval is too narrow (marked approx.) and a sign-flip "
            "permutation test over groups decides. McNemar's exact test compares correct answers; "
            '"better" or "worse" only where the deciding test and McNemar\'s agree.',
            paired,
        ]
    sections = [
        ("4-bit vs 8-bit (same model and config; delta = 4-bit minus 8-bit)", _bits_comparison(rows)),
        ("Standard vs safety-enhanced configs", _kinds_comparison(rows)),
        ("Zero-shot baseline vs fine-tuned", _baseline_comparison(rows, study["baselines"])),
        (
            "The floors (TF-IDF + logistic regression; a linear probe on each frozen base model; every run must "
            "beat them)",
            _floors(study.get("classical", {})),
        ),
        (
            "Reference rules (read nothing but the training labels; a run they match is never chosen)",
            _floors(study.get("references", {})),
        ),
        ("Model variants and their source precision", _sources(rows)),
    ]
    parts += [text for title, table in sections if table for text in (f"## {title}", table)]
    if any(str(r["source_precision"] or "").startswith("Q") for r in rows):
        parts.append(
            "A quantized GGUF source caps every variant made from it: its 8-bit variant "
            "cannot be better than the source precision listed above."
        )
    if figures:
        parts += ["## Figures", "Rendered by vl-convert-python (Vega-Lite, offline); each PNG has an SVG beside it."]
        parts += [f"### {title}\n\n![{title}]({link})" for title, link in figures.items()]
    if study["missing"]:
        parts += [
            "## Missing runs",
            "Selected in params.yaml `run:` but without results:",
            "\n".join(f"- {name}" for name in study["missing"]),
        ]
    return "\n\n".join(part for part in parts if part) + "\n"
