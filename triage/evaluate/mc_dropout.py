"""MC dropout: repeated stochastic passes of a LoRA-dropout adapter.

Votes are cast with the headline rule; the uncertain cases go to review.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from triage.config import EvaluateParams
from triage.evaluate import metrics as m
from triage.evaluate.decisions import Rule, argmax_decision
from triage.model.blocks import first_random_block, shared_lower_blocks
from triage.model.lm import ChatFormat, fanned_label_log_probs, shared_prefix
from triage.model.scoring import on_streams
from triage.schema import LABELS, Example


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


def mc_dropout_votes(
    model: nn.Module,
    fmt: ChatFormat,
    prompts: Sequence[str],
    samples: int,
    seed: int,
    streams: Sequence = (),
    rule: Rule = argmax_decision,
) -> np.ndarray:
    """(n_cases, samples) label indices with the LoRA dropout on; each sample votes with ``rule``.

    ``rule`` is the headline decision rule, so the votes disagree where the
    headline answer is fragile, and a miss of the headline can be flagged.
    The tokens every prompt starts with run once, as ``samples`` rows above the
    lower blocks (one dropout mask each); each case then continues every
    sample's row with its own tokens, so sample s of every case shares that
    prefix mask, and a case's samples stay independent of each other. The seed
    makes the masks, and so the votes, reproducible: they are drawn as the
    graphs are built, prefix first and then case by case, whichever stream runs them.
    """
    mx.random.seed(seed)
    tokens = [fmt.prompt_tokens(prompt) for prompt in prompts]
    model.train()
    try:
        with shared_lower_blocks(model, samples):
            prefix = shared_prefix(model, tokens)

            def sample(case: list[int]) -> mx.array:
                return mx.softmax(fanned_label_log_probs(model, fmt, [case], prefix)[:, 0], axis=1)

            probs = on_streams([partial(sample, case) for case in tokens], streams)
    finally:
        model.eval()
    return np.stack([[LABELS.index(label) for label in rule(np.array(p, dtype=np.float64))] for p in probs])


@dataclass(frozen=True)
class McDropout:
    """MC-dropout metrics for the run's JSON, plus per-case vote rows (all cases; ``flagged`` marks review)."""

    metrics: dict
    cases: list[dict]


def mc_dropout(
    model: nn.Module,
    fmt: ChatFormat,
    examples: list[Example],
    headline_preds: list[str],
    rule: Rule,
    params: EvaluateParams,
    dropout: float,
    streams: Sequence = (),
) -> McDropout:
    """Votes (cast with ``rule``, the headline rule), majority, confidence and uncertainty per case.

    Also the share flagged for review.
    """
    votes = mc_dropout_votes(model, fmt, [e.prompt for e in examples], params.mc_samples, params.seed, streams, rule)
    summary = m.vote_summary(votes)
    flags = m.flag_uncertain(summary["uncertainty"], params.uncertainty_threshold)
    majority = m.classification_metrics([e.label for e in examples], summary["majority"])
    cases = [
        {
            "id": e.id,
            "label": e.label,
            "pred": headline_preds[i],
            "vote": summary["majority"][i],
            "votes": dict(zip(LABELS, summary["counts"][i])),
            "confidence": summary["confidence"][i],
            "uncertainty": summary["uncertainty"][i],
            "flagged": flags["flags"][i],
        }
        for i, e in enumerate(examples)
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
