"""Score the reference rules every learner must beat, like every run: always ED, the majority label, and
the triage nurses where the cases carry their decision.

    dvc repro references

Each reference gets an evaluation.json and predictions.jsonl under --out/<name>/, made by the same
evaluate code (threshold frozen on valid, test and extra sets, the same rules and intervals).
"""

import argparse
from pathlib import Path

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from triage.config import load_params
from triage.evaluate.evaluation import evaluate_sets
from triage.evaluate.references import reference_scorers
from triage.io import staged_directory, write_json, write_jsonl
from triage.schema import read_examples
from triage.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="directory with train, valid and test .jsonl")
    parser.add_argument("--out", type=Path, required=True, help="one folder per reference")
    args = parser.parse_args()

    params = load_params()
    train, test = (read_examples(args.data / f"{name}.jsonl") for name in ("train", "test"))
    target = (params.evaluate.ed_threshold_target, "evaluate.ed_threshold_target")
    with staged_directory(args.out) as staged:
        for name, score in reference_scorers(train, test).items():
            metrics, predictions, _, _ = evaluate_sets(score, args.data, params.evaluate, target)
            (staged / name).mkdir(parents=True)
            write_jsonl(staged / name / "predictions.jsonl", predictions)
            write_json(
                staged / name / "evaluation.json",
                {
                    "run": name,
                    "adapter": False,
                    "mc_dropout": {"applicable": False, "reason": "a fixed rule: no dropout to sample"},
                    **metrics,
                },
            )
            print(
                f"[references] {name}: accuracy {metrics['accuracy']:.3f}, ED recall {metrics['ed_recall']}, "
                f"ED AUROC {metrics['ed_auroc']:.3f}"
            )


if __name__ == "__main__":
    run_stage(main, "references")
