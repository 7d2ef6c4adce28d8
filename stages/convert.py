"""Fetch one base model and write it as a float32 MLX model.

dvc repro convert@smollm2-135m
"""

import argparse
from pathlib import Path

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from triage.config import load_params
from triage.stage import run_stage
from triage.weights.sources import ModelSourceError, fetch_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a key of `models:` in params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    params = load_params()
    others = tuple(m for m in params.run.models if m != args.model)
    info = fetch_base_model(args.model, params.models[args.model].source, args.out, others)
    print(f"[convert] {args.model}: {info['source']} ({info['source_precision']}) -> {args.out}")


if __name__ == "__main__":
    run_stage(main, "convert", (ModelSourceError,))
