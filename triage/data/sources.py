"""Where the prepare stage gets its cases: the built-in generator or one of the importers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from triage.config import DataParams
from triage.data.catalogue import load_knowledge
from triage.data.conditions import Sizes, build
from triage.data.importers import (
    check_class_coverage,
    read_chat_jsonl,
    read_prompt_completion_jsonl,
    read_prompt_completion_splits,
    read_table,
)
from triage.data.ktas import read_ktas_csv
from triage.data.splits import split_by_group
from triage.schema import SPLITS, DataError, Example


def _reader(data: DataParams) -> Callable[[Path], list[Example]]:
    table = data.table
    return {
        "prompt_completion": read_prompt_completion_jsonl,
        "chat": read_chat_jsonl,
        "ktas": read_ktas_csv,
        "table": lambda path: read_table(
            path, table.format, table.text_field, table.label_field, table.label_map, encoding=table.encoding
        ),
    }[data.source]


def _split_files(directory: Path) -> dict[str, Path]:
    found = {}
    for name in SPLITS:
        matches = sorted(p for p in directory.glob(f"{name}.*") if p.is_file())
        if len(matches) != 1:
            raise DataError(
                directory,
                None,
                None,
                f"expected exactly one file named {name}.<ext>, found {[p.name for p in matches]}",
            )
        found[name] = matches[0]
    return found


def builtin_splits(data: DataParams) -> tuple[dict[str, list[Example]], dict]:
    """The generated cases per split with their two test conditions, and what was held out."""
    sizes = Sizes(train=data.n_examples, wording=data.conditions.wording, complaint=data.conditions.complaint)
    return build(load_knowledge(), sizes, data.label_mix, data.splits, data.conditions.held_out_share, data.seed)


def load_splits(data: DataParams) -> dict[str, list[Example]]:
    """Cases per split: generated, read from split files, or read and split by group."""
    if data.source == "builtin":
        return builtin_splits(data)[0]
    path = Path(data.path)
    if not path.exists():
        raise DataError(path, None, None, "data.path does not exist")
    if path.is_dir() and data.source == "prompt_completion":
        return read_prompt_completion_splits(path)
    read = _reader(data)
    if path.is_dir():
        splits = {name: read(file) for name, file in _split_files(path).items()}
        check_class_coverage(splits, str(path))
        return splits
    return split_by_group(read(path), data.splits, data.seed)
