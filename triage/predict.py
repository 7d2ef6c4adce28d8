"""Ask a trained run (or a base variant) to triage messages, and export a run as a standalone model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from triage import metrics
from triage.backend import optimize_for_device
from triage.config import EvaluateParams
from triage.lm import ChatFormat, label_log_probs
from triage.schema import LABELS, render_prompt

NOT_FOR_CLINICAL_USE = "Research tool, not for clinical use: do not use it to triage real patients."


class UnknownRun(LookupError):
    """The run name matches neither a trained run nor a quantized base variant."""


@dataclass(frozen=True)
class RunPaths:
    model_dir: Path
    adapter_dir: Path | None


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
            return RunPaths(model_dir, None)
        if run.startswith(variant + "-") and adapter.is_dir():
            return RunPaths(model_dir, adapter)
    listed = ", ".join(known_runs(root)) or "none yet: run `dvc repro` (or `make demo`) first"
    raise UnknownRun(f"unknown run '{run}' in {root}; available: {listed}")


class Triager:
    """A loaded model that scores the three labels for a message, with MC-dropout uncertainty."""

    def __init__(self, paths: RunPaths, params: EvaluateParams):
        from mlx_lm import load

        self.model, tokenizer = load(str(paths.model_dir), adapter_path=str(paths.adapter_dir) if paths.adapter_dir else None)
        optimize_for_device(self.model, inference=True)
        self.fmt = ChatFormat(tokenizer)
        self.params = params
        self.dropout = _adapter_dropout(paths.adapter_dir)

    def triage(self, text: str, case_id: str | None = None) -> dict:
        prompt = render_prompt(text)
        self.model.eval()
        probs = np.array(mx.softmax(label_log_probs(self.model, self.fmt, prompt), axis=-1), dtype=np.float64)
        result = {
            "id": case_id,
            "label": metrics.argmax_decision(probs)[0],
            "decision": metrics.cost_aware_decision(probs, self.params.cost_matrix)[0],
            **{f"p_{label}": round(float(probs[0, j]), 4) for j, label in enumerate(LABELS)},
        }
        return result | self._uncertainty(prompt)

    def _uncertainty(self, prompt: str) -> dict:
        if not self.dropout:
            return {"uncertainty": None, "flagged": None, "mc_dropout": "not applicable (no dropout in this run)"}
        self.model.train()
        votes = np.array(mx.argmax(label_log_probs(self.model, self.fmt, prompt, copies=self.params.mc_samples), axis=-1))
        self.model.eval()
        summary = metrics.vote_summary(votes[None, :])
        uncertainty = summary["uncertainty"][0]
        return {"uncertainty": round(uncertainty, 4), "flagged": uncertainty > self.params.uncertainty_threshold,
                "votes": dict(zip(LABELS, summary["counts"][0]))}


def _adapter_dropout(adapter_dir: Path | None) -> float:
    if adapter_dir is None:
        return 0.0
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return float(config["lora_parameters"]["dropout"])


def export_run(paths: RunPaths, out_dir: Path) -> None:
    """Fuse the adapter into its base variant and save an mlx-lm model (loadable with mlx_lm.load)."""
    from mlx_lm import load
    from mlx_lm.utils import save

    from triage.io import staged_directory

    model, tokenizer, config = load(str(paths.model_dir), adapter_path=str(paths.adapter_dir), return_config=True)
    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    model.update_modules(tree_unflatten(fused))
    with staged_directory(out_dir) as work:
        save(work, str(paths.model_dir), model, tokenizer, config, donate_model=False)
