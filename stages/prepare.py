"""Prepare the train/valid/test splits and their data card.

    dvc repro prepare

With data.source=builtin the cases are generated from triage/data/knowledge/;
otherwise they are imported from data.path (see params.yaml `data:`).
"""

import argparse
from pathlib import Path

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from triage.config import load_params
from triage.data.conditions import conditions_markdown
from triage.data.datacard import data_card, data_card_markdown
from triage.data.sources import builtin_splits, load_splits
from triage.data.splits import assert_no_leakage, check_leakage
from triage.io import atomic_write_text, staged_directory, write_json, write_jsonl
from triage.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    data = load_params().data
    splits, conditions = builtin_splits(data) if data.source == "builtin" else (load_splits(data), None)
    leakage = check_leakage(splits)
    assert_no_leakage(leakage)
    card = data_card(splits, leakage) | ({"conditions": conditions} if conditions else {})
    markdown = data_card_markdown(card) + (conditions_markdown(conditions) if conditions else "")
    with staged_directory(args.out) as work:
        for name, examples in splits.items():
            write_jsonl(work / f"{name}.jsonl", (e.to_json() for e in examples))
        write_json(work / "card.json", card)
        atomic_write_text(work / "card.md", markdown)
    print(f"[prepare] {', '.join(f'{k}: {len(v)}' for k, v in splits.items())} -> {args.out}")


if __name__ == "__main__":
    run_stage(main, "prepare")
