"""Quantize one base model to one bit width with mlx-lm and record its size.

dvc repro quantize@smollm2-135m-4bit
"""

import argparse
import json
from pathlib import Path

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from triage.config import bits_of, load_params
from triage.io import write_json
from triage.stage import run_stage
from triage.weights.sources import quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", required=True, help='e.g. "4bit"')
    parser.add_argument("--src", type=Path, required=True, help="float model from the convert stage")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()

    group_size = load_params().quantize.group_size
    facts = quantize_model(args.src, args.out, bits_of(args.bits), group_size)
    source = json.loads((args.src / "source.json").read_text())
    write_json(args.metrics, {**source, "bits": bits_of(args.bits), "group_size": group_size, **facts})
    print(f"[quantize] {args.out}: {facts['bits_per_weight']} bits/weight, {facts['disk_mb']} MB on disk")


if __name__ == "__main__":
    run_stage(main, "quantize")
