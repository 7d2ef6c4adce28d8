"""A data card for prepared splits: counts, subgroups, lengths and leakage.

``data_card`` returns a JSON-serialisable dict; ``data_card_markdown``
renders it for humans. Lengths are counted in *approximate* tokens (regex
word pieces), which tracks but does not equal any model tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
from tabulate import tabulate

from triage.schema import LABELS, Example
from triage.data.splits import groups_of, leakage_is_clean

APPROX_TOKEN = re.compile(r"\w+|[^\w\s]")
TOKEN_NOTE = r"approximate tokens: regex word pieces \w+|[^\w\s], not model tokenizer counts"
SUBGROUP_ATTRS: tuple[str, ...] = ("age_band", "sex")


def approx_tokens(text: str) -> int:
    return len(APPROX_TOKEN.findall(text))


def _labels_in(splits: dict[str, Sequence[Example]]) -> list[str]:
    present = {e.label for examples in splits.values() for e in examples}
    return [label for label in LABELS if label in present] + sorted(present - set(LABELS))


def _crosstab(splits: dict[str, Sequence[Example]], key: Callable[[Example], str],
              labels: list[str]) -> dict[str, dict]:
    """Per value of ``key``: counts by split, by label and in total."""
    table: dict[str, dict] = {}
    for name, examples in splits.items():
        for example in examples:
            row = table.setdefault(key(example), {"by_split": dict.fromkeys(splits, 0),
                                                  "by_label": dict.fromkeys(labels, 0), "total": 0})
            row["by_split"][name] += 1
            row["by_label"][example.label] += 1
            row["total"] += 1
    return dict(sorted(table.items()))


def _length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0.0, "p95": 0.0, "max": 0}
    array = np.asarray(values)
    return {"min": int(array.min()), "median": float(np.median(array)),
            "p95": float(np.percentile(array, 95)), "max": int(array.max())}


def data_card(splits: dict[str, Sequence[Example]], leakage_report: dict) -> dict:
    """Counts per split x label, per body system and subgroup, lengths and the leakage result."""
    labels = _labels_in(splits)
    return {
        "total": sum(len(examples) for examples in splits.values()),
        "splits": {name: {"examples": len(examples), "groups": len(groups_of(examples)),
                          "by_label": {label: sum(e.label == label for e in examples) for label in labels}}
                   for name, examples in splits.items()},
        "systems": _crosstab(splits, lambda e: e.attrs.get("system", "unknown"), labels),
        "subgroups": {attr: _crosstab(splits, lambda e, a=attr: e.attrs.get(a, "unknown"), labels)
                      for attr in SUBGROUP_ATTRS},
        "lengths": {
            "unit": TOKEN_NOTE,
            "by_split": {name: {"prompt": _length_stats([approx_tokens(e.prompt) for e in examples]),
                                "completion": _length_stats([approx_tokens(e.completion) for e in examples])}
                         for name, examples in splits.items()},
        },
        "leakage": {**leakage_report, "clean": leakage_is_clean(leakage_report)},
    }


def _crosstab_markdown(table: dict[str, dict], first: str) -> str:
    any_row = next(iter(table.values()), {"by_split": {}, "by_label": {}})
    headers = [first, *any_row["by_split"], *any_row["by_label"], "total"]
    rows = [[value, *row["by_split"].values(), *row["by_label"].values(), row["total"]]
            for value, row in table.items()]
    return tabulate(rows, headers=headers, tablefmt="github")


def data_card_markdown(card: dict) -> str:
    """The data card as Markdown tables."""
    split_rows = [[name, s["examples"], s["groups"], *s["by_label"].values()] for name, s in card["splits"].items()]
    labels = list(next(iter(card["splits"].values()))["by_label"]) if card["splits"] else []
    parts = ["# Data card", "", f"{card['total']} examples.", "", "## Splits", "",
             tabulate(split_rows, headers=["split", "examples", "groups", *labels], tablefmt="github"), ""]
    parts += ["## Body systems", "", _crosstab_markdown(card["systems"], "system"), ""]
    for attr, table in card["subgroups"].items():
        parts += [f"## Subgroup: {attr}", "", _crosstab_markdown(table, attr), ""]
    length_rows = [[name, part, *stats.values()] for name, by_part in card["lengths"]["by_split"].items()
                   for part, stats in by_part.items()]
    parts += ["## Lengths", "", f"Counted in {card['lengths']['unit']}.", "",
              tabulate(length_rows, headers=["split", "field", "min", "median", "p95", "max"], tablefmt="github"), ""]
    leakage = card["leakage"]
    parts += ["## Leakage", "", f"Status: **{'clean' if leakage['clean'] else 'NOT CLEAN'}** - "
              f"{leakage['exact']} exact and {leakage['near']} near-duplicate cross-split pairs "
              f"(threshold {leakage['threshold']}; {leakage.get('method', 'method not recorded')}).", ""]
    if leakage["examples"]:
        pair_rows = [[p["kind"], p["similarity"], *(f"{p[side]['split']}/{p[side]['id']}" for side in "ab")]
                     for p in leakage["examples"]]
        parts += [tabulate(pair_rows, headers=["kind", "similarity", "a", "b"], tablefmt="github"), ""]
    return "\n".join(parts)
