"""A data card for prepared splits: counts, subgroups, lengths, leakage and, for the built-in cases,
the knowledge base behind them.

``data_card`` returns a JSON-serialisable dict; ``data_card_markdown``
renders it for humans. Prompt lengths are counted in *approximate* tokens
(regex word pieces), which tracks but does not equal any model tokenizer;
message lengths in sentences and words are given per label so a reader can
see that length does not give the label away.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from tabulate import tabulate

from triage.data.catalogue import Knowledge, load_knowledge
from triage.data.splits import groups_of, leakage_is_clean, message_of
from triage.data.synth import reachable
from triage.schema import LABELS, Example

APPROX_TOKEN = re.compile(r"\w+|[^\w\s]")
TOKEN_NOTE = r"approximate tokens: regex word pieces \w+|[^\w\s], not model tokenizer counts"
SUBGROUP_ATTRS: tuple[str, ...] = ("age_band", "sex")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


def approx_tokens(text: str) -> int:
    return len(APPROX_TOKEN.findall(text))


def _labels_in(splits: dict[str, Sequence[Example]]) -> list[str]:
    present = {e.label for examples in splits.values() for e in examples}
    return [label for label in LABELS if label in present] + sorted(present - set(LABELS))


def _crosstab(
    splits: dict[str, Sequence[Example]], key: Callable[[Example], str], labels: list[str]
) -> dict[str, dict]:
    """Per value of ``key``: counts by split, by label and in total."""
    table: dict[str, dict] = {}
    for name, examples in splits.items():
        for example in examples:
            row = table.setdefault(
                key(example), {"by_split": dict.fromkeys(splits, 0), "by_label": dict.fromkeys(labels, 0), "total": 0}
            )
            row["by_split"][name] += 1
            row["by_label"][example.label] += 1
            row["total"] += 1
    return dict(sorted(table.items()))


def _length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0.0, "p95": 0.0, "max": 0}
    array = np.asarray(values)
    return {
        "min": int(array.min()),
        "median": float(np.median(array)),
        "p95": float(np.percentile(array, 95)),
        "max": int(array.max()),
    }


def data_card(splits: dict[str, Sequence[Example]], leakage_report: dict, knowledge: Knowledge | None = None) -> dict:
    """Counts per split x label, per body system and subgroup, lengths and the leakage result.

    Built-in cases (every example names its ``presentation``) also get their
    registers, the rules that set each label and a summary of ``knowledge``,
    which defaults to the packaged knowledge base they were generated from.
    """
    labels = _labels_in(splits)
    card = {
        "total": sum(len(examples) for examples in splits.values()),
        "splits": {
            name: {
                "examples": len(examples),
                "groups": len(groups_of(examples)),
                "by_label": {label: sum(e.label == label for e in examples) for label in labels},
            }
            for name, examples in splits.items()
        },
        "systems": _crosstab(splits, lambda e: e.attrs.get("system", "unknown"), labels),
        "subgroups": {
            attr: _crosstab(splits, lambda e, a=attr: e.attrs.get(a, "unknown"), labels) for attr in SUBGROUP_ATTRS
        },
        "lengths": {
            "unit": TOKEN_NOTE,
            "by_split": {
                name: {
                    "prompt": _length_stats([approx_tokens(e.prompt) for e in examples]),
                    "completion": _length_stats([approx_tokens(e.completion) for e in examples]),
                }
                for name, examples in splits.items()
            },
        },
        "message_length": _message_lengths(splits, labels),
        "leakage": {**leakage_report, "clean": leakage_is_clean(leakage_report)},
    }
    examples = [e for part in splits.values() for e in part]
    if examples and all("presentation" in e.attrs for e in examples):
        knowledge = knowledge or load_knowledge()
        card["registers"] = _crosstab(splits, lambda e: e.attrs.get("register", "unknown"), labels)
        card["rules"] = _rule_kinds(examples, knowledge, labels)
        card["knowledge"] = knowledge_summary(knowledge)
    return card


def sentence_count(example: Example) -> int:
    """The generator's count where it recorded one (texts lose their full stops), else full stops counted."""
    if "sentences" in example.attrs:
        return int(example.attrs["sentences"])
    return max(1, len(_SENTENCE_END.findall(message_of(example.prompt).strip())))


def _message_lengths(splits: dict[str, Sequence[Example]], labels: list[str]) -> dict:
    """Sentences (a histogram) and words (summary statistics) of the patient messages, overall and per label."""
    examples = [e for part in splits.values() for e in part]
    groups = {"all": examples, **{label: [e for e in examples if e.label == label] for label in labels}}
    return {
        "sentences": {
            name: {str(n): count for n, count in sorted(Counter(map(sentence_count, group)).items())}
            for name, group in groups.items()
        },
        "words": {
            name: _word_stats([len(message_of(e.prompt).split()) for e in group]) for name, group in groups.items()
        },
    }


def _word_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0.0, "mean": 0.0, "p95": 0.0, "max": 0}
    array = np.asarray(values)
    return {
        "min": int(array.min()),
        "median": float(np.median(array)),
        "mean": round(float(array.mean()), 1),
        "p95": float(np.percentile(array, 95)),
        "max": int(array.max()),
    }


def _rule_kinds(examples: Sequence[Example], knowledge: Knowledge, labels: list[str]) -> dict[str, dict[str, int]]:
    """Per label, how many cases the base label, a red flag or a host modifier decided."""
    modifiers = {m.id for m in knowledge.modifiers}
    kinds = {label: {"base": 0, "flag": 0, "modifier": 0} for label in labels}
    for example in examples:
        rule = example.attrs.get("rule", "base")
        kinds[example.label]["base" if rule == "base" else "modifier" if rule in modifiers else "flag"] += 1
    return kinds


def _spread(counts: list[int]) -> dict[str, float]:
    return {"items": len(counts), "min": min(counts, default=0), "median": float(np.median(counts)) if counts else 0.0}


def knowledge_summary(knowledge: Knowledge) -> dict:
    """Presentations per system and base label, the labels each system can reach, and phrasings per item."""
    systems: dict[str, dict] = {}
    for p in knowledge.presentations:
        row = systems.setdefault(p.system, {"presentations": 0, "base": dict.fromkeys(LABELS, 0), "reachable": set()})
        row["presentations"] += 1
        row["base"][p.base] += 1
        row["reachable"] |= {label for label in LABELS for band in p.ages if reachable(p, label, band, knowledge)}
    for row in systems.values():
        row["reachable"] = [label for label in LABELS if label in row["reachable"]]
    flags = [f for p in knowledge.presentations for f in p.flags]
    screening = knowledge.phrasing["screening"]
    return {
        "systems": systems,
        "phrasings": {
            "say": _spread([len(p.say) for p in knowledge.presentations]),
            "context": _spread([len(p.context) for p in knowledge.presentations]),
            "flag say": _spread([len(f.say) for f in flags]),
            "flag deny": _spread([len(f.deny) for f in flags]),
            "screening (per system)": _spread([len(screening.get(system, [])) for system in systems]),
        },
    }


def _crosstab_markdown(table: dict[str, dict], first: str) -> str:
    any_row = next(iter(table.values()), {"by_split": {}, "by_label": {}})
    headers = [first, *any_row["by_split"], *any_row["by_label"], "total"]
    rows = [[value, *row["by_split"].values(), *row["by_label"].values(), row["total"]] for value, row in table.items()]
    return tabulate(rows, headers=headers, tablefmt="github")


def _knowledge_markdown(summary: dict) -> list[str]:
    system_rows = [
        [system, row["presentations"], *row["base"].values(), " ".join(row["reachable"])]
        for system, row in summary["systems"].items()
    ]
    phrasing_rows = [[item, *spread.values()] for item, spread in summary["phrasings"].items()]
    return [
        "## Knowledge base",
        "",
        "Presentations per system by base label, and the labels each system can "
        "reach through its base, red flags and host modifiers.",
        "",
        tabulate(system_rows, headers=["system", "presentations", *LABELS, "reachable"], tablefmt="github"),
        "",
        "Phrasings per item (a presentation's `say` and `context`, a flag's `say` and `deny`, a system's "
        "screening negations).",
        "",
        tabulate(phrasing_rows, headers=["phrasing", "items", "min", "median"], tablefmt="github"),
        "",
    ]


def _message_length_markdown(lengths: dict) -> list[str]:
    counts = sorted({int(n) for histogram in lengths["sentences"].values() for n in histogram})
    sentence_rows = [
        [name, *(histogram.get(str(n), 0) for n in counts)] for name, histogram in lengths["sentences"].items()
    ]
    word_rows = [[name, *stats.values()] for name, stats in lengths["words"].items()]
    return [
        "## Message length",
        "",
        "Sentences and words of the patient's side of each message, overall and "
        "per label: a length that only one label used would let a model guess the label from the form.",
        "",
        tabulate(sentence_rows, headers=["sentences", *map(str, counts)], tablefmt="github"),
        "",
        tabulate(word_rows, headers=["words", "min", "median", "mean", "p95", "max"], tablefmt="github"),
        "",
    ]


def data_card_markdown(card: dict) -> str:
    """The data card as Markdown tables."""
    split_rows = [[name, s["examples"], s["groups"], *s["by_label"].values()] for name, s in card["splits"].items()]
    labels = list(next(iter(card["splits"].values()))["by_label"]) if card["splits"] else []
    parts = [
        "# Data card",
        "",
        f"{card['total']} examples.",
        "",
        "## Splits",
        "",
        tabulate(split_rows, headers=["split", "examples", "groups", *labels], tablefmt="github"),
        "",
    ]
    parts += ["## Body systems", "", _crosstab_markdown(card["systems"], "system"), ""]
    for attr, table in card["subgroups"].items():
        parts += [f"## Subgroup: {attr}", "", _crosstab_markdown(table, attr), ""]
    if "registers" in card:
        parts += [
            "## Registers",
            "",
            "Who writes and how: the patient, a parent or carer, a partner or relative, "
            "a terse text, a worried ramble, or a clinician's summary.",
            "",
            _crosstab_markdown(card["registers"], "register"),
            "",
        ]
    length_rows = [
        [name, part, *stats.values()]
        for name, by_part in card["lengths"]["by_split"].items()
        for part, stats in by_part.items()
    ]
    parts += [
        "## Lengths",
        "",
        f"Counted in {card['lengths']['unit']}.",
        "",
        tabulate(length_rows, headers=["split", "field", "min", "median", "p95", "max"], tablefmt="github"),
        "",
    ]
    parts += _message_length_markdown(card["message_length"])
    if "rules" in card:
        rule_rows = [[label, *kinds.values()] for label, kinds in card["rules"].items()]
        parts += [
            "## Rules",
            "",
            "Which rule set each label: the presentation's base label, a red flag, or a host modifier.",
            "",
            tabulate(rule_rows, headers=["label", "base", "flag", "modifier"], tablefmt="github"),
            "",
        ]
    if "knowledge" in card:
        parts += _knowledge_markdown(card["knowledge"])
    leakage = card["leakage"]
    parts += [
        "## Leakage",
        "",
        f"Status: **{'clean' if leakage['clean'] else 'NOT CLEAN'}** - "
        f"{leakage['exact']} exact and {leakage['near']} near-duplicate cross-split pairs "
        f"(threshold {leakage['threshold']}; {leakage.get('method', 'method not recorded')}).",
        "",
    ]
    if leakage["examples"]:
        pair_rows = [
            [p["kind"], p["similarity"], *(f"{p[side]['split']}/{p[side]['id']}" for side in "ab")]
            for p in leakage["examples"]
        ]
        parts += [tabulate(pair_rows, headers=["kind", "similarity", "a", "b"], tablefmt="github"), ""]
    return "\n".join(parts)
