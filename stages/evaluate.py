"""Evaluate one run (or a base variant with no adapter) on the test split and the extra sets.

    dvc repro evaluate@smollm2-135m-4bit-balanced_safe
    dvc repro baseline@smollm2-135m-4bit

The validation split is scored first and in full: the ED threshold is tuned and
frozen there, and its metrics are what compare ranks runs on. Runs whose
adapter has LoRA dropout also write the MC-dropout review list.
"""

import argparse
import json
from pathlib import Path

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from mlx_lm import load

from triage.config import load_params
from triage.evaluate.decisions import ed_recall_target
from triage.evaluate.evaluation import headline_file
from triage.evaluate.language_model import evaluate_model
from triage.evaluate.mc_dropout import adapter_dropout
from triage.io import write_csv, write_json, write_jsonl
from triage.model.device import cpu_streams, optimize_for_device
from triage.model.lm import ChatFormat
from triage.model.mlx_lm_internals import check_supported
from triage.stage import run_stage

RAW_DATA = Path("data/raw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="run name recorded in the metrics")
    parser.add_argument("--config", help="the run's LoRA config (for its target_ed_recall); omit for the baseline")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, help="adapter directory; omit for the zero-shot baseline")
    parser.add_argument("--data", type=Path, required=True, help="directory with valid.jsonl and test.jsonl")
    parser.add_argument("--metrics", type=Path, required=True, help="compact eval.json: the dozen numbers DVC shows")
    parser.add_argument("--details", type=Path, required=True, help="evaluation.json: every rule, interval and gate")
    parser.add_argument("--training", type=Path, help="the run's train.json (its peak memory goes into --metrics)")
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument(
        "--confusion",
        type=Path,
        required=True,
        help="CSV of id, label, pred for DVC's confusion plot (DVC plots cannot read JSONL)",
    )
    parser.add_argument("--review", type=Path, help="JSONL of the cases MC dropout flags as uncertain")
    args = parser.parse_args()

    params = load_params()
    for extra in params.evaluate.extra_sets:
        # DVC tracks data/raw for this stage; a file elsewhere can change without re-running it.
        if not Path(extra.path).resolve().is_relative_to(RAW_DATA.resolve()):
            print(
                f"[evaluate] warning: extra set '{extra.name}' ({extra.path}) is outside {RAW_DATA}/, "
                "so DVC will not notice when it changes"
            )
    model, tokenizer = load(str(args.model_dir), adapter_path=str(args.adapter) if args.adapter else None)
    check_supported(model)
    print(f"[evaluate] {triage.RUNTIME}; {optimize_for_device(model, inference=True)}")

    result = evaluate_model(
        model,
        ChatFormat(tokenizer),
        args.data,
        params.evaluate,
        params.train.max_seq_length,
        ed_recall_target(params, args.config),
        adapter_dropout(args.adapter),
        cpu_streams(params.train.cpu_streams),
    )
    write_jsonl(args.predictions, result.predictions)
    write_csv(args.confusion, result.predictions, ("id", "label", "pred"))
    if args.review:
        write_jsonl(args.review, result.review)
    write_json(args.details, {"run": args.run, "adapter": bool(args.adapter), **result.metrics})
    peak_memory = json.loads(args.training.read_text())["peak_memory_mb"] if args.training else None
    write_json(args.metrics, headline_file(result.metrics, peak_memory))
    mc = result.metrics["mc_dropout"]
    mc_text = f"{mc['n_flagged']} flagged for review" if mc["applicable"] else "MC dropout not applicable"
    top = result.metrics
    print(
        f"[evaluate] {args.run} ({top['decision']}): accuracy {top['accuracy']:.3f}, ED recall {top['ed_recall']}, "
        f"ED AUROC {top['ed_auroc']}, safe {top['safe']}; valid accuracy {top['valid']['accuracy']:.3f}; "
        f"{mc_text} -> {args.metrics}"
    )


if __name__ == "__main__":
    run_stage(main, "evaluate")
