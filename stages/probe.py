"""Fit and score the linear-probe floor of one base variant: what the frozen model already knows.

    dvc repro probe@smollm2-135m-4bit

A logistic regression on the frozen model's mean hidden state over each
message, fitted on the train split, its C chosen on validation, then scored by
the same evaluate code as every run (threshold frozen on valid, test and extra
sets, the same rules and intervals).
"""

import argparse
from pathlib import Path

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from mlx_lm import load

from triage.config import load_params
from triage.evaluate.evaluation import evaluate_sets
from triage.evaluate.probe import fit_probe, probe_scorer
from triage.io import staged_directory, write_json, write_jsonl
from triage.model.device import cpu_streams, optimize_for_device
from triage.model.features import prompt_features
from triage.model.lm import ChatFormat
from triage.model.mlx_lm_internals import check_supported
from triage.report import SELECTION_CONDITION, probe_name
from triage.schema import read_examples
from triage.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="the base model's key in params.yaml models:")
    parser.add_argument("--bits", required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="directory with train, valid and test .jsonl")
    parser.add_argument("--out", type=Path, required=True, help="folder for evaluation.json and predictions.jsonl")
    args = parser.parse_args()

    params = load_params()
    model, tokenizer = load(str(args.model_dir))
    check_supported(model)
    print(f"[probe] {triage.runtime.setup()}; {optimize_for_device(model, inference=True)}")
    fmt, streams = ChatFormat(tokenizer), cpu_streams(params.train.cpu_streams)

    def features(examples):
        return prompt_features(model, fmt, [e.prompt for e in examples], params.evaluate.batch_size, streams)

    train_path, valid_path = args.data / "train.jsonl", args.data / "valid.jsonl"
    probe, choice = fit_probe(
        read_examples(train_path),
        read_examples(valid_path),
        features,
        params.probe,
        SELECTION_CONDITION,
        str(train_path),
    )
    target = (params.evaluate.ed_threshold_target, "evaluate.ed_threshold_target")
    metrics, predictions, _, _ = evaluate_sets(probe_scorer(probe, features), args.data, params.evaluate, target)
    name = probe_name(args.model, args.bits)
    with staged_directory(args.out) as staged:
        staged.mkdir(parents=True)
        write_jsonl(staged / "predictions.jsonl", predictions)
        write_json(
            staged / "evaluation.json",
            {
                "run": name,
                "adapter": False,
                "probe": choice,
                "mc_dropout": {
                    "applicable": False,
                    "reason": "a linear probe on frozen features: no dropout to sample",
                },
                **metrics,
            },
        )
    print(
        f"[probe] {name} (C {choice['inverse_regularisation']}): accuracy {metrics['accuracy']:.3f}, "
        f"ED recall {metrics['ed_recall']}, ED AUROC {metrics['ed_auroc']:.3f} -> {args.out}"
    )


if __name__ == "__main__":
    run_stage(main, "probe")
