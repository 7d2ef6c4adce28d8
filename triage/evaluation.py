"""Evaluate a (possibly adapted) model on labelled cases: label scores to safety metrics.

One evaluation scores the validation split first: it freezes the ED threshold
and gives the metrics that runs are ranked and chosen on (never the test
split's). Then it scores the test split and every extra set with the same
three decision rules, threshold and gates. Runs whose adapter has LoRA dropout
also get MC-dropout votes on the test split, cast with the headline rule; the
cases whose votes disagree most go to review.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from scipy.special import logsumexp, softmax

from triage import metrics as m
from triage.batches import collate
from triage.config import EvaluateParams, ExtraSet, Params
from triage.importers import read_chat_jsonl, read_ktas_csv, read_prompt_completion_jsonl, read_table
from triage.lm import (
    ChatFormat, TokenizedCase, batch_label_log_probs, label_log_probs, shared_prefix, tokenize_split,
)
from triage.losses import plain_loss
from triage.schema import LABELS, DataError, Example, read_examples

HEADLINE = ("accuracy", "macro_f1", "ed_recall", "ed_f2", "ed_fnr", "ed_fn", "safe",
            "under_triage_rate", "over_triage_rate", "unsafe_rate")
DISCRIMINATION = ("ed_auroc", "ed_ap", "ed_recall_at_budget")
SUBGROUP_ATTRS = ("age_band", "sex")


def on_streams(tasks: list[Callable[[], mx.array]], streams: Sequence = ()) -> list[mx.array]:
    """The tasks' results, in order; each round of tasks (one per stream) is built on the streams and evaluated together.

    On a CPU every MLX stream is a thread, so a round of independent cases runs
    in parallel; without streams the tasks run one at a time on the default stream.
    """
    lanes = list(streams) or [mx.default_stream(mx.default_device())]
    results: list[mx.array] = []
    for start in range(0, len(tasks), len(lanes)):
        round_ = []
        for task, stream in zip(tasks[start : start + len(lanes)], lanes):
            with mx.stream(stream):
                round_.append(task())
        mx.eval(round_)
        results.extend(round_)
    return results


def label_log_likelihoods(model: nn.Module, fmt: ChatFormat, examples: list[Example], batch_size: int,
                          streams: Sequence = ()) -> np.ndarray:
    """(n, 3) log-probabilities of the label options as the answer, not renormalised, dropout off.

    Cases go through in batches of similar prompt length, so little compute goes
    to padding, after the tokens all prompts share have run once.
    """
    model.eval()
    prompts = [fmt.prompt_tokens(example.prompt) for example in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    prefix = shared_prefix(model, prompts)

    def score(chunk: list[int]) -> mx.array:
        return batch_label_log_probs(model, fmt, [prompts[i] for i in chunk], prefix)

    scores = np.zeros((len(prompts), len(LABELS)))
    for chunk, chunk_scores in zip(chunks, on_streams([partial(score, chunk) for chunk in chunks], streams)):
        scores[chunk] = np.array(chunk_scores, dtype=np.float64)
    return scores


def label_probabilities(model: nn.Module, fmt: ChatFormat, examples: list[Example], batch_size: int,
                        streams: Sequence = ()) -> np.ndarray:
    """(n, 3) probabilities of the label options, normalised over the three, dropout off."""
    return softmax(label_log_likelihoods(model, fmt, examples, batch_size, streams), axis=1)


def task_metrics(model: nn.Module, fmt: ChatFormat, examples: list[Example], batch_size: int,
                 streams: Sequence = ()) -> dict[str, float | None]:
    """``val_accuracy`` (argmax) and ``val_ed_auroc`` of the label scores, for curves and checkpoint selection.

    The AUROC is None when the cases are all ED or all not.
    """
    probs = label_probabilities(model, fmt, examples, batch_size, streams)
    labels = [example.label for example in examples]
    discrimination = m.ed_discrimination(labels, probs[:, m.ED], ())
    return {"val_accuracy": m.classification_metrics(labels, m.argmax_decision(probs))["accuracy"],
            "val_ed_auroc": discrimination["ed_auroc"]}


def completion_loss(model: nn.Module, cases: list[TokenizedCase], batch_size: int, streams: Sequence = ()) -> float:
    """Mean cross-entropy per completion token over every case (the study's test loss).

    Batches are cut from the length-sorted cases here rather than by the
    training batcher, which only forms full batches and would drop the
    remainder of a split whose size is not a multiple of ``batch_size``.
    """
    model.eval()
    ordered = sorted(cases, key=lambda case: len(case.tokens))

    def summed(batch: list[TokenizedCase]) -> mx.array:
        loss, ntoks = plain_loss(model, *collate(batch, mask_prompt=True))
        return mx.stack([loss * ntoks, ntoks.astype(loss.dtype)])

    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    total, tokens = np.sum([np.array(pair, dtype=np.float64) for pair in on_streams(
        [partial(summed, batch) for batch in batches], streams)], axis=0)
    return float(total / tokens)


@dataclass(frozen=True)
class ScoredSet:
    """One labelled set after scoring: its cases, label probabilities (dropout off) and loss.

    ``label_mass`` is each case's probability of answering with any of the three
    labels before they are renormalised: a model that puts its mass on other
    tokens still gets a decision, and this shows how little it rests on.
    """

    examples: list[Example]
    probs: np.ndarray
    loss: float | None  # mean completion cross-entropy; None for a model that does not generate text
    label_mass: np.ndarray | None = None

    @property
    def labels(self) -> list[str]:
        return [example.label for example in self.examples]

    @property
    def groups(self) -> list[str]:
        return [example.group for example in self.examples]


def score_set(
    model: nn.Module, fmt: ChatFormat, examples: list[Example], source: str, max_len: int, batch_size: int,
    streams: Sequence = (),
) -> ScoredSet:
    """Label probabilities and completion loss of ``examples``; an over-long case is an error naming ``source``."""
    cases = tokenize_split(fmt, examples, source, max_len)
    log_likelihoods = label_log_likelihoods(model, fmt, examples, batch_size, streams)
    return ScoredSet(examples, softmax(log_likelihoods, axis=1), completion_loss(model, cases, batch_size, streams),
                     np.exp(logsumexp(log_likelihoods, axis=1)))


def read_extra_set(spec: ExtraSet) -> list[Example]:
    """The cases of one `evaluate.extra_sets` entry, through the importers, cut to ``limit``."""
    encoding = spec.encoding or ("cp1254" if spec.format == "ktas" else "utf-8")
    if spec.format in ("csv", "jsonl"):
        examples = read_table(
            spec.path, spec.format, spec.text_field, spec.label_field, spec.label_map, spec.id_field,
            spec.attr_fields or (), encoding, spec.delimiter or ",",
        )
    else:
        reader = {"prompt_completion": read_prompt_completion_jsonl, "chat": read_chat_jsonl,
                  "ktas": read_ktas_csv}[spec.format]
        examples = reader(spec.path, encoding)
    return examples[: spec.limit]


@dataclass(frozen=True)
class EdThreshold:
    """The p(ED) threshold tuned on the validation split, frozen before any other set is scored."""

    value: float | None
    target_recall: float
    target_from: str
    n_valid: int
    reason: str | None = None

    def describe(self) -> dict:
        return {"threshold": self.value, "target_recall": self.target_recall, "target_from": self.target_from,
                "tuned_on": "valid", "n_valid": self.n_valid}


def ed_recall_target(params: Params, config_name: str | None) -> tuple[float, str]:
    """The ED recall the threshold aims for: a safety config's own target, else the evaluate default."""
    if config_name is not None:
        target = params.config(config_name).target_ed_recall
        if target is not None:
            return target, f"configs.{config_name}.target_ed_recall"
    return params.evaluate.ed_threshold_target, "evaluate.ed_threshold_target"


def freeze_ed_threshold(valid: list[Example], probs: np.ndarray, target: float, target_from: str) -> EdThreshold:
    """Tune the threshold on the validation cases; without an ED case there it stays undefined."""
    labels = [example.label for example in valid]
    if "ED" not in labels:
        return EdThreshold(None, target, target_from, len(valid),
                           "the validation split has no ED case to tune the threshold on")
    return EdThreshold(m.tune_ed_threshold(probs, labels, target), target, target_from, len(valid))


Rule = Callable[[np.ndarray], list[str]]
"""A decision rule: (n, 3) label probabilities to one label per row."""


def decision_rules(params: EvaluateParams, threshold: EdThreshold) -> dict[str, Rule]:
    """Every applicable decision rule by name; ``ed_threshold`` only once a threshold is tuned."""
    rules: dict[str, Rule] = {"argmax": m.argmax_decision,
                              "cost_aware": partial(m.cost_aware_decision, cost=params.cost_matrix)}
    if threshold.value is not None:
        rules["ed_threshold"] = partial(m.threshold_decision, threshold=threshold.value)
    return rules


def decide(probs: np.ndarray, params: EvaluateParams, threshold: EdThreshold) -> dict[str, list[str]]:
    """Every applicable decision rule's answers, so reports can show what each one changes."""
    return {name: rule(probs) for name, rule in decision_rules(params, threshold).items()}


CI_METHOD = ("ed_recall, ed_fnr: exact Clopper-Pearson; accuracy, macro_f1, ed_f2, ed_auroc: percentile "
             f"bootstrap, {m.BOOTSTRAP_RESAMPLES} seeded resamples of presentation groups (of cases without one)")


def rule_metrics(scored: ScoredSet, preds: list[str], params: EvaluateParams, weights: np.ndarray) -> dict:
    """Scores of one decision rule, its gates and 95% intervals, flat enough for dvc metrics.

    ``weights`` are the set's cluster-bootstrap resamples, shared by every rule.
    """
    labels, gates_params = scored.labels, params.gates
    scores = m.classification_metrics(labels, preds)
    gates = m.safety_gates(scores, gates_params.ed_recall_min, gates_params.ed_f2_min, gates_params.ed_fnr_max)
    boot = m.bootstrap_intervals(weights, labels, preds, scored.probs[:, m.ED])
    intervals = {**m.ed_recall_intervals(labels, preds), **{k: boot[k] for k in ("accuracy", "macro_f1", "ed_f2")}}
    return {
        **{key: scores[key] for key in HEADLINE if key in scores}, "safe": gates["safe"],
        **m.triage_rates(labels, preds),
        "gates": {name: {k: g[k] for k in ("state", "value", "threshold", "margin")}
                  for name, g in gates["gates"].items()},
        "ci95": {"method": CI_METHOD, **intervals},
        "gates_hold_at_pessimistic_end": {
            "ed_recall": m.gate_holds_at_bound(intervals["ed_recall"], gates_params.ed_recall_min, at_least=True),
            "ed_f2": m.gate_holds_at_bound(intervals["ed_f2"], gates_params.ed_f2_min, at_least=True),
            "ed_fnr": m.gate_holds_at_bound(intervals["ed_fnr"], gates_params.ed_fnr_max, at_least=False),
        },
        "per_class": scores["per_class"],
        "n_unclassified": scores["n_unclassified"],
        "n": scores["n"],
    }


def label_mass_summary(mass: np.ndarray | None) -> dict:
    """Mean and 10th percentile of the raw probability of answering with one of the labels."""
    if mass is None:
        return {"mean": None, "p10": None}
    return {"mean": float(np.mean(mass)), "p10": float(np.quantile(mass, 0.1))}


def set_metrics(scored: ScoredSet, params: EvaluateParams, threshold: EdThreshold) -> dict:
    """Metrics of one scored set: the headline rule's keys on top, every rule, calibration, subgroups."""
    labels = scored.labels
    decisions = decide(scored.probs, params, threshold)
    clusters = m.cluster_ids(scored.groups)
    weights = m.bootstrap_weights(clusters)
    by_rule = {rule: rule_metrics(scored, preds, params, weights) for rule, preds in decisions.items()}
    by_rule.setdefault("ed_threshold", {"applicable": False, "reason": threshold.reason})
    by_rule["ed_threshold"] |= threshold.describe()
    top = by_rule[params.decision]
    discrimination = m.ed_discrimination(labels, scored.probs[:, m.ED], params.over_triage_budgets)
    auroc_interval = m.bootstrap_intervals(weights, labels, decisions[params.decision], scored.probs[:, m.ED])
    attrs = sorted({key for e in scored.examples for key in e.attrs if key in SUBGROUP_ATTRS})
    return {
        "decision": params.decision,
        **{key: top[key] for key in (*HEADLINE, "gates")},
        **discrimination,
        "ci95": {**top["ci95"], "ed_auroc": auroc_interval["ed_auroc"]},
        "ci95_clusters": int(clusters.max()) + 1,
        "gates_hold_at_pessimistic_end": top["gates_hold_at_pessimistic_end"],
        "test_loss": scored.loss,
        "perplexity": None if scored.loss is None else math.exp(scored.loss),
        "n_cases": len(labels),
        "label_mass": label_mass_summary(scored.label_mass),
        "calibration": {"ece": m.expected_calibration_error(scored.probs, labels),
                        "brier": m.brier_score(scored.probs, labels)},
        **by_rule,
        "subgroups": {
            attr: m.subgroup_rates(labels, decisions[params.decision], [e.attrs.get(attr) for e in scored.examples])
            for attr in attrs
        },
    }


def prediction_rows(scored: ScoredSet, params: EvaluateParams, threshold: EdThreshold) -> list[dict]:
    """One row per case for the confusion plot and for audit."""
    decisions = decide(scored.probs, params, threshold)
    return [
        {"id": e.id, "group": e.group, "label": e.label, "pred": decisions[params.decision][i],
         **{rule: preds[i] for rule, preds in decisions.items()},
         **{f"p_{label}": round(float(scored.probs[i, j]), 6) for j, label in enumerate(LABELS)},
         **e.attrs}
        for i, e in enumerate(scored.examples)
    ]


def adapter_dropout(adapter: Path | None) -> float | None:
    """The LoRA dropout an adapter was trained with (after `lora:` overrides); None without an adapter."""
    if adapter is None:
        return None
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    return float(config["lora_parameters"]["dropout"])


def mc_not_applicable(dropout: float | None) -> str | None:
    """Why MC dropout cannot run for this model, or None when it can."""
    if dropout is None:
        return "no adapter (zero-shot baseline): the base model has no dropout to sample"
    if dropout == 0:
        return "the adapter was trained with LoRA dropout 0: every sample would give the same answer"
    return None


class _FanOut(nn.Module):
    """A transformer block that runs on ``copies`` repeats of its one-row input."""

    def __init__(self, block: nn.Module, copies: int):
        super().__init__()
        self.block = block
        self.copies = copies

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        return self.block(mx.broadcast_to(x, (self.copies, *x.shape[1:])), *args, **kwargs)

    def __getattr__(self, key: str):
        # Model loops read per-block flags (llama's `use_sliding`); answer for the wrapped block.
        if key != "block" and "block" in self and key not in self:
            return getattr(self["block"], key)
        return super().__getattr__(key)


def first_random_block(model: nn.Module) -> int:
    """Index of the lowest transformer block holding a dropout layer (0 when there is none)."""
    for index, block in enumerate(model.model.layers):
        if any(isinstance(module, nn.Dropout) for _, module in block.named_modules()):
            return index
    return 0


@contextmanager
def shared_lower_blocks(model: nn.Module, copies: int) -> Iterator[int]:
    """Compute the blocks below the first dropout layer once instead of once per sample.

    Dropout lives only in the LoRA layers of the top blocks, so every sample
    sees the same activations below them. Inside the context the first random
    block repeats its input ``copies`` times: the caller feeds the number of
    rows yielded (1, or ``copies`` when nothing can be shared) and gets
    ``copies`` rows out. The dropout masks are drawn with the same shapes in
    the same order as for a plain batch, so a seeded run gives the same samples.
    """
    layers = model.model.layers
    first = first_random_block(model)
    if first == 0:
        yield copies
        return
    original = layers[first]
    layers[first] = _FanOut(original, copies)
    try:
        yield 1
    finally:
        layers[first] = original


def mc_dropout_votes(model: nn.Module, fmt: ChatFormat, examples: list[Example], samples: int, seed: int,
                     streams: Sequence = (), rule: Rule = m.argmax_decision) -> np.ndarray:
    """(n_cases, samples) label indices with the LoRA dropout on; each sample votes with ``rule``.

    ``rule`` is the headline decision rule, so the votes disagree where the
    headline answer is fragile, and a miss of the headline can be flagged.
    The samples of a case are one batch; the seed makes the dropout masks, and so
    the votes, reproducible: masks are drawn case by case as the graphs are built,
    whichever stream then runs them.
    """
    mx.random.seed(seed)
    model.train()
    try:
        with shared_lower_blocks(model, samples) as rows:

            def sample(prompt: str) -> mx.array:
                return mx.softmax(label_log_probs(model, fmt, prompt, copies=rows), axis=1)

            probs = on_streams([partial(sample, example.prompt) for example in examples], streams)
    finally:
        model.eval()
    return np.stack([[LABELS.index(label) for label in rule(np.array(p, dtype=np.float64))] for p in probs])


@dataclass(frozen=True)
class McDropout:
    """MC-dropout metrics for the run's JSON, plus per-case vote rows (all cases; ``flagged`` marks review)."""

    metrics: dict
    cases: list[dict]


def mc_dropout(
    model: nn.Module, fmt: ChatFormat, scored: ScoredSet, headline_preds: list[str],
    params: EvaluateParams, threshold: EdThreshold, dropout: float, streams: Sequence = (),
) -> McDropout:
    """Votes (by the headline rule), majority, confidence and uncertainty per case, and the share flagged."""
    rule = decision_rules(params, threshold)[params.decision]
    votes = mc_dropout_votes(model, fmt, scored.examples, params.mc_samples, params.seed, streams, rule)
    summary = m.vote_summary(votes)
    flags = m.flag_uncertain(summary["uncertainty"], params.uncertainty_threshold)
    majority = m.classification_metrics(scored.labels, summary["majority"])
    cases = [
        {"id": e.id, "label": e.label, "pred": headline_preds[i], "vote": summary["majority"][i],
         "votes": dict(zip(LABELS, summary["counts"][i])), "confidence": summary["confidence"][i],
         "uncertainty": summary["uncertainty"][i], "flagged": flags["flags"][i]}
        for i, e in enumerate(scored.examples)
    ]
    # The misses that matter most: true ED answered otherwise by the headline rule.
    missed_ed = [case for case in cases if case["label"] == "ED" and case["pred"] != "ED"]
    metrics = {
        "applicable": True,
        "dropout": dropout,
        "samples": params.mc_samples,
        "seed": params.seed,
        "vote": f"each sample votes with the headline rule ({params.decision})",
        "mean_confidence": float(np.mean(summary["confidence"])),
        "mean_uncertainty": float(np.mean(summary["uncertainty"])),
        "uncertainty_threshold": params.uncertainty_threshold,
        "n_flagged": flags["n_flagged"],
        "flagged_rate": flags["rate"],
        "ed_misses": len(missed_ed),
        "ed_misses_flagged": sum(case["flagged"] for case in missed_ed),
        "majority_vote": {key: majority[key] for key in ("accuracy", "macro_f1", "ed_recall", "ed_fnr", "ed_fn")},
        "blocks_shared_across_samples": first_random_block(model),
    }
    return McDropout(metrics, cases)


@dataclass(frozen=True)
class Evaluation:
    """What the evaluate stage writes: the metrics JSON, the predictions rows and the review rows."""

    metrics: dict
    predictions: list[dict]
    review: list[dict]


Scorer = Callable[[list[Example], str], ScoredSet]
"""Scores one labelled set: (its cases, the file they came from, for errors) to label probabilities."""


def evaluate_sets(score: Scorer, data_dir: Path, params: EvaluateParams, target: tuple[float, str],
                  ) -> tuple[dict, list[dict], ScoredSet, EdThreshold]:
    """Score ``valid.jsonl`` (freezing the ED threshold there), then ``test.jsonl`` and the extra sets.

    Any model goes through here, a language model or the classical baseline,
    so every run's numbers come from the same rules, metrics and intervals.
    The validation split's metrics go under ``valid``: runs are ranked and
    chosen on them, so the test split's numbers stay an unbiased report.
    Returns the metrics, the test split's prediction rows, the scored test
    split and the frozen threshold.
    """
    valid_path = data_dir / "valid.jsonl"
    valid = score(read_examples(valid_path), str(valid_path))
    threshold = freeze_ed_threshold(valid.examples, valid.probs, *target)
    if params.decision == "ed_threshold" and threshold.value is None:
        raise DataError(valid_path, None, "label", "no ED case: evaluate.decision ed_threshold needs one to tune on")

    test_path = data_dir / "test.jsonl"
    test = score(read_examples(test_path), str(test_path))
    metrics = set_metrics(test, params, threshold)
    metrics["valid"] = set_metrics(valid, params, threshold)
    metrics["extra_sets"] = {
        spec.name: {"path": spec.path, "format": spec.format,
                    **set_metrics(score(read_extra_set(spec), spec.path), params, threshold)}
        for spec in params.extra_sets
    }
    return metrics, prediction_rows(test, params, threshold), test, threshold


def evaluate_model(
    model: nn.Module, fmt: ChatFormat, data_dir: Path, params: EvaluateParams, max_len: int,
    target: tuple[float, str], dropout: float | None, streams: Sequence = (),
) -> Evaluation:
    """:func:`evaluate_sets` for a language model, plus MC-dropout votes on the test split.

    ``target`` is the ED recall the threshold aims for and where it comes from
    (see ``ed_recall_target``); ``dropout`` is the adapter's (``adapter_dropout``);
    ``streams`` (``triage.backend.cpu_streams``) score independent cases in parallel.
    """
    def score(examples: list[Example], source: str) -> ScoredSet:
        return score_set(model, fmt, examples, source, max_len, params.batch_size, streams)

    metrics, predictions, test, threshold = evaluate_sets(score, data_dir, params, target)
    reason = mc_not_applicable(dropout)
    review: list[dict] = []
    if reason is None:
        mc = mc_dropout(model, fmt, test, [row["pred"] for row in predictions], params, threshold, dropout, streams)
        metrics["mc_dropout"] = mc.metrics
        for row, case in zip(predictions, mc.cases):
            row |= {"mc_vote": case["vote"], "mc_confidence": case["confidence"],
                    "mc_uncertainty": case["uncertainty"]}
        review = [{k: v for k, v in case.items() if k != "flagged"} for case in mc.cases if case["flagged"]]
    else:
        metrics["mc_dropout"] = {"applicable": False, "reason": reason}
    return Evaluation(metrics, predictions, review)
