"""Train one LoRA adapter on a quantized variant.

    dvc repro train@smollm2-135m-4bit-balanced_safe

Resumes from its checkpoint (outside the DVC cache) when re-run after a kill.
"""

import argparse
from pathlib import Path

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from triage.config import load_params
from triage.stage import run_stage
from triage.train.loop import TrainingDiverged
from triage.train.wiring import TrainPaths, train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True, help="DVCLive directory for the training curves")
    parser.add_argument("--checkpoints", type=Path, required=True)
    args = parser.parse_args()
    train_adapter(
        load_params(),
        args.config,
        TrainPaths(args.model_dir, args.data, args.adapter, args.metrics, args.log, args.checkpoints),
    )


if __name__ == "__main__":
    run_stage(main, "train", (TrainingDiverged,))
