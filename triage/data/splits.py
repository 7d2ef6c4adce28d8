"""Group-aware, label-stratified splits and a cross-split leakage check.

``split_by_group`` keeps every ``Example.group`` inside one split (a
presentation rendered several ways must not be in train and test at once)
while matching the requested fractions per label as closely as grouping
allows. ``check_leakage`` then looks for exact and near-duplicate patient
messages across splits with character 5-gram Jaccard similarity, found via
MinHash with locality-sensitive hashing and confirmed exactly.
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations

import numpy as np

from triage.schema import LABELS, DataError, Example, render_prompt

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "valid": 0.1, "test": 0.1}
SHINGLE_CHARS = 5
_NUM_HASHES = 128
_REPORT_EXAMPLES = 5
_PROMPT_PREFIX = render_prompt("x")[:-1]

# Fixed hash parameters: reports must not depend on any seed.
_PARAMS = np.random.default_rng(20240611)
_MULTIPLIERS = _PARAMS.integers(1, 2**63, size=_NUM_HASHES, dtype=np.uint64) | np.uint64(1)
_OFFSETS = _PARAMS.integers(0, 2**63, size=_NUM_HASHES, dtype=np.uint64)


class SplitError(DataError):
    """A split lacks a class that the data contain."""

    def __init__(self, split: str, label: str, message: str):
        self.split, self.label = split, label
        super().__init__(f"split '{split}'", None, "label", message)


class LeakageError(DataError):
    """The same or nearly the same patient message sits in two splits."""

    def __init__(self, report: dict):
        self.report = report
        pairs = "; ".join(
            f"{p['a']['split']}/{p['a']['id']} ~ {p['b']['split']}/{p['b']['id']} ({p['similarity']})"
            for p in report["examples"]
        )
        super().__init__(
            "splits",
            None,
            "prompt",
            f"{report['exact']} exact and {report['near']} near-duplicate (Jaccard >= "
            f"{report['threshold']}) cross-split message pairs, e.g. {pairs}",
        )


# --------------------------------------------------------------------------- splitting
def _check_fractions(fractions: dict[str, float]) -> dict[str, float]:
    if not fractions or any(w < 0 for w in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"split fractions must be non-negative with a positive total, got {fractions}")
    total = sum(fractions.values())
    return {name: weight / total for name, weight in fractions.items()}


def _label_order(examples: Sequence[Example]) -> list[str]:
    present = {e.label for e in examples}
    return [label for label in LABELS if label in present] + sorted(present - set(LABELS))


def split_by_group(examples: Sequence[Example], fractions: dict[str, float], seed: int) -> dict[str, list[Example]]:
    """Assign whole groups to splits, stratified by label as far as grouping allows.

    Examples without a group are their own group. Groups are placed largest
    first into the split whose per-label counts move closest to their targets;
    a split left without some class then takes the smallest group of that class
    that another split can spare. Raises ``SplitError`` naming the split and
    class when that is impossible. Splits keep the input order of examples.
    """
    weights = _check_fractions(fractions)
    names = list(weights)
    labels = _label_order(examples)
    members: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        members[example.group or f"id:{example.id}"].append(index)
    keys = list(members)
    counts = np.zeros((len(keys), len(labels)))
    for row, key in enumerate(keys):
        for index in members[key]:
            counts[row, labels.index(examples[index].label)] += 1
    targets = np.array([weights[name] for name in names])[:, None] * counts.sum(axis=0)[None, :]
    owner = _greedy_assign(counts, targets, np.random.default_rng(seed))
    _repair_missing(counts, owner, targets)
    filled = _split_totals(counts, owner, len(names))
    for s, name in enumerate(names):
        for c, label in enumerate(labels):
            if targets[s, c] > 0 and filled[s, c] == 0:
                holders = int((counts[:, c] > 0).sum())
                raise SplitError(
                    name,
                    label,
                    f"no examples of class '{label}': its {int(counts[:, c].sum())} "
                    f"examples sit in {holders} group(s), too few to reach every split",
                )
    return {
        name: [examples[i] for i in sorted(i for row, key in enumerate(keys) if owner[row] == s for i in members[key])]
        for s, name in enumerate(names)
    }


def _split_totals(counts: np.ndarray, owner: np.ndarray, n_splits: int) -> np.ndarray:
    totals = np.zeros((n_splits, counts.shape[1]))
    np.add.at(totals, owner, counts)
    return totals


def _greedy_assign(counts: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Largest groups first, each to the split whose normalised squared error grows least."""
    order = rng.permutation(len(counts))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    current = np.zeros_like(targets)
    scale = np.maximum(targets, 1.0)
    open_splits = targets.sum(axis=1) > 0
    owner = np.zeros(len(counts), dtype=int)
    for row in order:
        before = ((current - targets) ** 2 / scale).sum(axis=1)
        after = ((current + counts[row] - targets) ** 2 / scale).sum(axis=1)
        growth = np.where(open_splits, after - before, np.inf)
        owner[row] = int(np.argmin(growth))
        current[owner[row]] += counts[row]
    return owner


def _repair_missing(counts: np.ndarray, owner: np.ndarray, targets: np.ndarray) -> None:
    """Move a small group into any split that lacks a class, if a donor can spare it."""
    n_splits, n_labels = targets.shape
    for s in range(n_splits):
        for c in range(n_labels):
            totals = _split_totals(counts, owner, n_splits)
            if targets[s, c] == 0 or totals[s, c] > 0:
                continue
            spare = [
                row
                for row in range(len(counts))
                if counts[row, c] > 0
                and owner[row] != s
                and np.all((totals[owner[row]] - counts[row] > 0) | (totals[owner[row]] == 0) | (counts[row] == 0))
            ]
            if spare:
                owner[min(spare, key=lambda row: (counts[row].sum(), row))] = s


# --------------------------------------------------------------------------- leakage
def normalise_text(text: str) -> str:
    """Lower-case alphanumeric words joined by single spaces: the form duplicates are judged in."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def message_of(prompt: str) -> str:
    """The patient's message inside a prompt; the shared instruction would mask differences."""
    return prompt[len(_PROMPT_PREFIX) :] if prompt.startswith(_PROMPT_PREFIX) else prompt


def shingles(text: str) -> np.ndarray:
    """Sorted unique 32-bit hashes of the character 5-grams of normalised text."""
    text = normalise_text(text)
    grams = [text[i : i + SHINGLE_CHARS] for i in range(max(1, len(text) - SHINGLE_CHARS + 1))]
    return np.unique(np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams)))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b, assume_unique=True)) / union if union else 1.0


def _signature(hashes: np.ndarray) -> np.ndarray:
    # Multiply-shift hashing: wrap-around uint64 products, keep the high 32 bits.
    return ((hashes[None, :] * _MULTIPLIERS[:, None] + _OFFSETS[:, None]) >> np.uint64(32)).min(axis=1)


def _bands_for(threshold: float) -> tuple[int, int]:
    """LSH bands x rows whose S-curve midpoint sits well below the threshold, for high recall."""
    for rows in (16, 8, 4, 2):
        bands = _NUM_HASHES // rows
        if (1 / bands) ** (1 / rows) <= threshold - 0.15:
            return bands, rows
    return _NUM_HASHES, 1


def _candidate_pairs(signatures: np.ndarray, split_of: Sequence[int], threshold: float) -> set[tuple[int, int]]:
    bands, rows = _bands_for(threshold)
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for doc, signature in enumerate(signatures[:, band * rows : (band + 1) * rows]):
            buckets[signature.tobytes()].append(doc)
        for docs in buckets.values():
            pairs.update((a, b) for a, b in combinations(docs, 2) if split_of[a] != split_of[b])
    return pairs


def _pair(kind: str, similarity: float, docs: Sequence[tuple[str, Example, str]], a: int, b: int) -> dict:
    return {
        "kind": kind,
        "similarity": round(similarity, 3),
        "a": {"split": docs[a][0], "id": docs[a][1].id, "text": docs[a][2][:100]},
        "b": {"split": docs[b][0], "id": docs[b][1].id, "text": docs[b][2][:100]},
    }


def check_leakage(
    splits: dict[str, Sequence[Example]],
    near_duplicate_threshold: float = 0.9,
    max_examples: int | None = _REPORT_EXAMPLES,
) -> dict:
    """Count exact and near-duplicate patient messages shared between different splits.

    ``examples`` lists up to ``max_examples`` pairs (all with None), exact ones
    first; in each pair ``a`` comes from a split listed before ``b``'s.

    Messages are compared without the shared instruction, after
    ``normalise_text``. Exact means equal normalised text; near means a
    character 5-gram Jaccard similarity of at least the threshold. Candidate
    pairs come from MinHash LSH (recall above 99.9% at the threshold) and are
    then confirmed with the exact Jaccard value.
    """
    if not 0.0 < near_duplicate_threshold <= 1.0:
        raise ValueError("near_duplicate_threshold must be in (0, 1]")
    docs = [(name, example, message_of(example.prompt)) for name, examples in splits.items() for example in examples]
    split_ids = {name: i for i, name in enumerate(splits)}
    split_of = [split_ids[name] for name, _, _ in docs]
    normalised = [normalise_text(text) for _, _, text in docs]
    by_text: dict[str, list[int]] = defaultdict(list)
    for doc, text in enumerate(normalised):
        by_text[text].append(doc)
    exact = [(a, b) for group in by_text.values() for a, b in combinations(group, 2) if split_of[a] != split_of[b]]
    hashed = [shingles(text) for text in normalised]
    signatures = np.array([_signature(h) for h in hashed]).reshape(len(docs), _NUM_HASHES)
    near = []
    for a, b in sorted(_candidate_pairs(signatures, split_of, near_duplicate_threshold)):
        if normalised[a] != normalised[b]:
            similarity = jaccard(hashed[a], hashed[b])
            if similarity >= near_duplicate_threshold:
                near.append((similarity, a, b))
    near.sort(key=lambda item: -item[0])
    limit = len(exact) + len(near) if max_examples is None else max_examples
    examples = [_pair("exact", 1.0, docs, a, b) for a, b in exact[:limit]]
    examples += [_pair("near", s, docs, a, b) for s, a, b in near[: limit - len(examples)]]
    return {
        "exact": len(exact),
        "near": len(near),
        "threshold": near_duplicate_threshold,
        "method": f"normalised exact match + character {SHINGLE_CHARS}-gram Jaccard (MinHash LSH, "
        f"{_NUM_HASHES} hashes), patient message only",
        "examples": examples,
    }


def leakage_is_clean(report: dict) -> bool:
    return report["exact"] == 0 and report["near"] == 0


def assert_no_leakage(report: dict) -> None:
    """Raise ``LeakageError`` listing the first offending pairs when a report is not clean."""
    if not leakage_is_clean(report):
        raise LeakageError(report)


def groups_of(examples: Iterable[Example]) -> set[str]:
    return {e.group or f"id:{e.id}" for e in examples}
