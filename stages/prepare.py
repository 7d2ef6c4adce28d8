"""Prepare the train/valid/test splits and their data card.

    dvc repro prepare

With data.source=builtin the cases are generated from triage/knowledge/; with
prompt_completion they are read from data.path (a directory with
train/valid/test.jsonl, or one JSONL file that is split here).
"""

import argparse
from pathlib import Path

from triage.config import DataParams, load_params
from triage.datacard import data_card, data_card_markdown
from triage.importers import read_prompt_completion_jsonl, read_prompt_completion_splits
from triage.io import atomic_write_text, staged_directory, write_json, write_jsonl
from triage.schema import Example
from triage.splits import assert_no_leakage, check_leakage, split_by_group
from triage.synth import generate


def load_splits(data: DataParams) -> dict[str, list[Example]]:
    if data.source == "builtin":
        return split_by_group(generate(data.n_examples, data.label_mix, data.seed), data.splits, data.seed)
    path = Path(data.path)
    if path.is_dir():
        return read_prompt_completion_splits(path)
    return split_by_group(read_prompt_completion_jsonl(path), data.splits, data.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    splits = load_splits(load_params().data)
    leakage = check_leakage(splits)
    assert_no_leakage(leakage)
    card = data_card(splits, leakage)
    with staged_directory(args.out) as work:
        for name, examples in splits.items():
            write_jsonl(work / f"{name}.jsonl", (e.to_json() for e in examples))
        write_json(work / "card.json", card)
        atomic_write_text(work / "card.md", data_card_markdown(card))
    print(f"[prepare] {', '.join(f'{k}: {len(v)}' for k, v in splits.items())} -> {args.out}")


if __name__ == "__main__":
    main()
