"""Ask a trained run (or a base variant) to triage messages, and export a run as a standalone model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlx.utils import tree_unflatten

from triage.config import EvaluateParams
from triage.evaluate.decisions import EdThreshold, decision_rules
from triage.evaluate.mc_dropout import adapter_dropout, mc_dropout_votes, mc_not_applicable
from triage.evaluate.metrics import flag_uncertain, vote_summary
from triage.model.device import cpu_streams, optimize_for_device
from triage.model.lm import ChatFormat
from triage.model.scoring import label_probabilities
from triage.schema import LABELS, DataError, render_prompt

NOT_FOR_CLINICAL_USE = "Research tool, not for clinical use: do not use it to triage real patients."


class UnknownRun(LookupError):
    """The run name matches neither a trained run nor a quantized base variant, or it cannot answer yet."""


@dataclass(frozen=True)
class RunPaths:
    name: str
    model_dir: Path
    adapter_dir: Path | None
    evaluation: Path  # the run's evaluation.json, which holds the p(ED) threshold its evaluate stage froze


def known_runs(root: Path) -> list[str]:
    trained = sorted(p.parent.name for p in root.glob("runs/*/adapter") if p.is_dir())
    variants = sorted(f"{p.parent.name}-{p.name}" for p in root.glob("models/*/*bit") if p.is_dir())
    return trained + variants


def resolve_run(root: Path, run: str) -> RunPaths:
    """``<model>-<bits>-<config>`` (a trained run) or ``<model>-<bits>`` (the base variant, no adapter)."""
    adapter = root / "runs" / run / "adapter"
    for model_dir in sorted(root.glob("models/*/*bit")):
        variant = f"{model_dir.parent.name}-{model_dir.name}"
        if run == variant:
            return RunPaths(run, model_dir, None, root / "metrics" / "baseline" / variant / "evaluation.json")
        if run.startswith(variant + "-") and adapter.is_dir():
            return RunPaths(run, model_dir, adapter, root / "metrics" / "runs" / run / "evaluation.json")
    listed = ", ".join(known_runs(root)) or "none yet: run `dvc repro` (or `make demo`) first"
    raise UnknownRun(f"unknown run '{run}' in {root}; available: {listed}")


def frozen_threshold(paths: RunPaths, params: EvaluateParams) -> EdThreshold:
    """The p(ED) threshold the run's evaluate stage tuned on the validation split, as it wrote it."""
    if not paths.evaluation.is_file():
        if params.decision == "ed_threshold":
            raise UnknownRun(
                f"run '{paths.name}' answers with evaluate.decision: ed_threshold, whose threshold its "
                f"evaluate stage tunes on the validation split; {paths.evaluation} does not exist yet: "
                "run `dvc repro` first"
            )
        return EdThreshold(
            None,
            params.ed_threshold_target,
            "evaluate.ed_threshold_target",
            0,
            f"not evaluated yet ({paths.evaluation} missing)",
        )
    frozen = json.loads(paths.evaluation.read_text(encoding="utf-8"))["ed_threshold"]
    return EdThreshold(
        frozen["threshold"], frozen["target_recall"], frozen["target_from"], frozen["n_valid"], frozen.get("reason")
    )


class Triager:
    """A run loaded once, answering as its evaluate stage does.

    The same label scores, decision rules and MC-dropout votes.
    """

    def __init__(self, paths: RunPaths, params: EvaluateParams, streams: int, max_len: int, source: str):
        from mlx_lm import load

        adapter = str(paths.adapter_dir) if paths.adapter_dir else None
        self.model, tokenizer = load(str(paths.model_dir), adapter_path=adapter)
        optimize_for_device(self.model, inference=True)
        self.fmt = ChatFormat(tokenizer)
        self.params = params
        self.rules = decision_rules(params, frozen_threshold(paths, params))
        self.not_applicable = mc_not_applicable(adapter_dropout(paths.adapter_dir))
        self.streams = cpu_streams(streams)
        self.max_len, self.source = max_len, source

    def triage(self, messages: list[tuple[str, str]]) -> list[dict]:
        """One answer per ``(id, text)``, scored in batches that share the prompt prefix, as evaluate scores a split."""
        prompts = [render_prompt(text) for _, text in messages]
        self._check_lengths([case_id for case_id, _ in messages], prompts)
        probs = label_probabilities(self.model, self.fmt, prompts, self.params.batch_size, self.streams)
        answers = {name: rule(probs) for name, rule in self.rules.items()}
        rows = [
            {
                "id": case_id,
                "pred": answers[self.params.decision][i],
                "decision_rule": self.params.decision,
                **{name: preds[i] for name, preds in answers.items()},
                **{f"p_{label}": round(float(probs[i, j]), 6) for j, label in enumerate(LABELS)},
            }
            for i, (case_id, _) in enumerate(messages)
        ]
        return [row | mc for row, mc in zip(rows, self._uncertainty(prompts))]

    def _check_lengths(self, ids: list[str], prompts: list[str]) -> None:
        """Nothing is truncated: a message whose prompt and longest label exceed the limit is an error naming it."""
        longest_label = max(len(tokens) for tokens in self.fmt.label_tokens)
        for case_id, prompt in zip(ids, prompts):
            length = len(self.fmt.prompt_tokens(prompt)) + longest_label
            if length > self.max_len:
                raise DataError(
                    self.source,
                    None,
                    "text",
                    f"message {case_id!r} is {length} tokens with the prompt "
                    f"and its answer, above train.max_seq_length={self.max_len}; shorten it",
                )

    def _uncertainty(self, prompts: list[str]) -> list[dict]:
        if self.not_applicable is not None:
            return [{"mc_dropout": f"not applicable: {self.not_applicable}"}] * len(prompts)
        votes = mc_dropout_votes(
            self.model,
            self.fmt,
            prompts,
            self.params.mc_samples,
            self.params.seed,
            self.streams,
            self.rules[self.params.decision],
        )
        summary = vote_summary(votes)
        flags = flag_uncertain(summary["uncertainty"], self.params.uncertainty_threshold)["flags"]
        return [
            {
                "mc_vote": summary["majority"][i],
                "mc_uncertainty": summary["uncertainty"][i],
                "flagged": flags[i],
                "votes": dict(zip(LABELS, summary["counts"][i])),
            }
            for i in range(len(prompts))
        ]


@dataclass(frozen=True)
class ExportCheck:
    """How the exported model's label probabilities compare with base + adapter on the same prompts."""

    cases: int
    agreement: float  # share of cases whose argmax label is the same
    max_abs_diff: float  # largest |p_exported - p_adapter| over cases and labels


def export_run(paths: RunPaths, out_dir: Path, prompts: list[str], batch_size: int) -> ExportCheck:
    """Fuse the adapter into its base variant, save an mlx-lm model (loadable with mlx_lm.load), and check it.

    The adapted layers stay in float, so the exported model equals base + adapter up to
    float rounding; the check on ``prompts`` measures it.
    """
    from mlx_lm import load
    from mlx_lm.utils import save

    from triage.io import staged_directory

    def probabilities(model_dir: Path, adapter: Path | None):
        model, tokenizer = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
        optimize_for_device(model, inference=True)
        return label_probabilities(model, ChatFormat(tokenizer), prompts, batch_size)

    model, tokenizer, config = load(str(paths.model_dir), adapter_path=str(paths.adapter_dir), return_config=True)
    # The adapted layers are written in float: the base dequantized plus the LoRA delta. Re-quantized to the
    # base's bits, the small delta rounds away (SmolLM2-135M 4-bit: 19% argmax agreement with base + adapter,
    # 93% with the base); the other layers stay quantized, and mlx_lm.load reads the mix.
    fused = [(name, module.fuse(dequantize=True)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    model.update_modules(tree_unflatten(fused))
    with staged_directory(out_dir) as work:
        save(work, str(paths.model_dir), model, tokenizer, config, donate_model=False)
    adapted, exported = probabilities(paths.model_dir, paths.adapter_dir), probabilities(out_dir, None)
    return ExportCheck(
        len(prompts),
        float(np.mean(adapted.argmax(axis=1) == exported.argmax(axis=1))),
        float(np.abs(adapted - exported).max()),
    )
