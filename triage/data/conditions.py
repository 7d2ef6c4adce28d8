"""Two test conditions for the built-in cases, so the study asks two questions.

``wording``: complaints that training has seen, written in phrasings it never
saw. A share of every phrasing list is held out: presentation ``say`` and
``context``, flag ``say`` and ``deny``, modifier ``say`` and the shared pools
of ``phrasing.yaml``. Did fine-tuning learn the triage rules?

``complaint``: presentations that training never saw (whole groups held out),
written with the held-out phrasings too. Does the model bring medical
knowledge of its own?

Each list is partitioned on its own, seeded by its place in the knowledge
base, so adding a presentation never moves another one's held-out lines.
Validation takes a line of its own where a list can spare one and keeps two
for training; a shorter list lends validation the training lines. No training
or validation message contains a test line: ``find_held_out_lines`` proves it
on the rendered text.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from triage.data.catalogue import PATIENT_TOKENS, TOKEN, Knowledge, assemble
from triage.data.splits import check_leakage, message_of, normalise_text
from triage.data.synth import _PRONOUNS, fill, generate
from triage.schema import LABELS, DataError, Example

CONDITIONS: tuple[str, ...] = ("wording", "complaint")
PARTS: tuple[str, ...] = ("train", "valid", "test")

# Lists of one item (a presentation, flag or modifier) lose a line from 2 lines on;
# shared pools from 3, as a pool of 2 would leave training one way to say it.
_MIN_ITEM_LINES = 2
_MIN_POOL_LINES = 3
# Vocabulary, not phrasing: "daughter" or "F" in test is not new wording.
_VOCABULARY = frozenset({"relations", "nouns", "sexwords", "greetings", "connectors"})
# A line with fewer literal words than this cannot be told apart in a message by its text.
MIN_CHECKED_WORDS = 3


@dataclass(frozen=True)
class HeldOut:
    """One list's lines for each part; ``test`` lines are never rendered in train or valid."""

    where: str
    train: tuple[Any, ...]
    valid: tuple[Any, ...]
    test: tuple[Any, ...]


def partition_lines(lines: Sequence[Any], where: str, share: float, seed: int, min_lines: int) -> HeldOut:
    """Split one phrasing list into train, valid and test lines, seeded by its address ``where``."""
    lines = tuple(lines)
    if len(lines) < min_lines:
        return HeldOut(where, lines, lines, lines)
    n_test = max(1, round(share * len(lines)))
    n_valid = n_test if len(lines) - 2 * n_test >= 2 else 0
    order = list(range(len(lines)))
    random.Random(f"{seed}:{where}").shuffle(order)
    test, valid = sorted(order[:n_test]), sorted(order[n_test : n_test + n_valid])
    train = [i for i in range(len(lines)) if i not in test and i not in valid]
    pick = lambda indices: tuple(lines[i] for i in indices)  # noqa: E731
    return HeldOut(where, pick(train), pick(valid) if valid else pick(train), pick(test))


class WordingSplit:
    """The knowledge base seen by each part, and every list's held-out lines."""

    def __init__(self, knowledge: Knowledge, share: float, seed: int):
        if not 0.0 < share < 1.0:
            raise ValueError(f"held_out_share must be between 0 and 1, got {share}")
        self.share, self.seed = share, seed
        self.lists: list[HeldOut] = []
        self._by_place: dict[str, HeldOut] = {}
        self.parts = {part: self._variant(knowledge, part) for part in PARTS}

    def _split(self, lines: Sequence[Any], where: str, min_lines: int) -> HeldOut:
        if where not in self._by_place:
            self._by_place[where] = partition_lines(lines, where, self.share, self.seed, min_lines)
            self.lists.append(self._by_place[where])
        return self._by_place[where]

    def _variant(self, knowledge: Knowledge, part: str) -> Knowledge:
        presentations = tuple(self._item(p, f"presentation {p.id}", part) for p in knowledge.presentations)
        modifiers = tuple(self._item(m, f"modifier {m.id}", part) for m in knowledge.modifiers)
        phrasing = self._pool(knowledge.phrasing, "phrasing", part)
        return assemble(presentations, modifiers, phrasing)

    def _item(self, item: Any, where: str, part: str) -> Any:
        """A presentation, flag or modifier with each of its phrasing tuples cut to ``part``'s lines."""
        changes = {}
        for spec in fields(item):
            value = getattr(item, spec.name)
            if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value) and _is_phrasing(value):
                changes[spec.name] = getattr(self._split(value, f"{where} {spec.name}", _MIN_ITEM_LINES), part)
            elif isinstance(value, tuple) and value and all(is_dataclass(v) for v in value):
                changes[spec.name] = tuple(self._item(v, f"{where} {spec.name} {v.id}", part) for v in value)
        return replace(item, **changes)

    def _pool(self, node: Any, where: str, part: str) -> Any:
        if isinstance(node, dict):
            return {
                key: value if key in _VOCABULARY or key == "__line__" else self._pool(value, f"{where}.{key}", part)
                for key, value in node.items()
            }
        if isinstance(node, list) and node and all(isinstance(v, (str, dict)) for v in node):
            return list(getattr(self._split(node, where, _MIN_POOL_LINES), part))
        return node

    def held_out(self) -> list[HeldOut]:
        """The lists that lost lines to the test part."""
        return [held for held in self.lists if held.test != held.train]


def _is_phrasing(value: tuple[str, ...]) -> bool:
    """Tuples of templates, as opposed to tuples of ids, age bands or tags."""
    return any(" " in v for v in value)


def _line_text(line: Any) -> str:
    return line["say"] if isinstance(line, dict) else line


def split_presentations(knowledge: Knowledge, fractions: dict[str, float], seed: int) -> dict[str, set[str]]:
    """Whole presentations for the complaint condition's valid and test parts, stratified by base label."""
    rng = random.Random(f"{seed}:presentations")
    owner: dict[str, set[str]] = {part: set() for part in PARTS}
    total = sum(fractions.get(part, 0.0) for part in PARTS)
    for label in LABELS:
        ids = sorted(p.id for p in knowledge.presentations if p.base == label)
        rng.shuffle(ids)
        n_valid = round(len(ids) * fractions.get("valid", 0.0) / total)
        n_test = round(len(ids) * fractions.get("test", 0.0) / total)
        owner["valid"].update(ids[:n_valid])
        owner["test"].update(ids[n_valid : n_valid + n_test])
        owner["train"].update(ids[n_valid + n_test :])
    return owner


def only(knowledge: Knowledge, presentation_ids: set[str]) -> Knowledge:
    kept = tuple(p for p in knowledge.presentations if p.id in presentation_ids)
    return assemble(kept, knowledge.modifiers, knowledge.phrasing)


@dataclass(frozen=True)
class Sizes:
    train: int
    wording: dict[str, int]
    complaint: dict[str, int]


def build(
    knowledge: Knowledge,
    sizes: Sizes,
    label_mix: dict[str, float],
    fractions: dict[str, float],
    share: float,
    seed: int,
) -> tuple[dict[str, list[Example]], dict]:
    """Train, valid and test cases with ``attrs["condition"]``, and a report of what was held out.

    A valid or test case whose message nearly duplicates a training message
    (the leakage check's rule) is dropped rather than scored as unseen.
    """
    wording = WordingSplit(knowledge, share, seed)
    owner = split_presentations(knowledge, fractions, seed)
    train = _cases(only(wording.parts["train"], owner["train"]), sizes.train, label_mix, seed, "train", "")
    splits: dict[str, list[Example]] = {"train": train, "valid": [], "test": []}
    seen = {e.group for e in train}  # a small training set may leave a presentation out
    for part in ("valid", "test"):
        for condition, presentations in (("wording", seen), ("complaint", owner[part])):
            n = getattr(sizes, condition)[part]
            knowledge_seen = only(wording.parts[part], presentations)
            splits[part] += _cases(knowledge_seen, n, label_mix, seed, part, condition)
    dropped = _drop_near_duplicates(splits)
    held = wording.held_out()
    report = {
        "held_out_share": share,
        "presentations": {part: len(ids) for part, ids in owner.items()},
        "lists_held_out": len(held),
        "lists_too_short": len(wording.lists) - len(held),
        "lines_held_out_for_test": sum(len(h.test) for h in held),
        "lines_held_out_for_valid": sum(len(h.valid) for h in held if h.valid != h.train),
        "dropped_near_duplicates": dropped,
        "cases": {
            part: {condition: sum(e.attrs.get("condition") == condition for e in examples) for condition in CONDITIONS}
            for part, examples in splits.items()
            if part != "train"
        },
    }
    hits = find_held_out_lines({part: splits[part] for part in ("train", "valid")}, wording.lists)
    report["held_out_check"] = hits
    assert_held_out_clean(hits)
    return splits, report


def _cases(
    knowledge: Knowledge, n: int, label_mix: dict[str, float], seed: int, part: str, condition: str
) -> list[Example]:
    if n == 0:
        return []
    examples = generate(n, label_mix, random.Random(f"{seed}:{part}:{condition}").randrange(2**31), knowledge=knowledge)
    prefix = f"{part[0]}{condition[:1]}"
    return [
        replace(e, id=f"{prefix}{e.id}", attrs={**e.attrs, **({"condition": condition} if condition else {})})
        for e in examples
    ]


def _drop_near_duplicates(splits: dict[str, list[Example]]) -> dict[str, int]:
    """Remove valid/test cases that the leakage check pairs with a case of another split."""
    report = check_leakage(splits, max_examples=None)
    doomed = {(pair["b"]["split"], pair["b"]["id"]) for pair in report["examples"]}
    dropped = {}
    for part in ("valid", "test"):
        before = len(splits[part])
        splits[part] = [e for e in splits[part] if (part, e.id) not in doomed]
        dropped[part] = before - len(splits[part])
    return dropped


def _pattern(template: str) -> re.Pattern[str] | None:
    """A regex over normalised text matching a template in any voice; None when too short to tell."""
    pieces, literal_words, last = [], 0, 0
    for match in TOKEN.finditer(template):
        literal = normalise_text(template[last : match.start()])
        literal_words += len(literal.split())
        pieces.append(re.escape(literal))
        pieces.append(_placeholder(match.group(1)))
        last = match.end()
    literal = normalise_text(template[last:])
    literal_words += len(literal.split())
    pieces.append(re.escape(literal))
    if literal_words < MIN_CHECKED_WORDS:
        return None
    body = r"\s*".join(p for p in pieces if p)
    return re.compile(rf"(?<![a-z0-9]){body}(?![a-z0-9])")


def _placeholder(token: str) -> str:
    if "|" in token:
        forms = token.split("|")
    elif token in PATIENT_TOKENS or token in _PRONOUNS["first"]:
        forms = [voice[token] for voice in _PRONOUNS.values() if token in voice]
    else:
        return r"[a-z0-9 ]{1,30}?"  # a value such as an age or a relation
    return "(?:" + "|".join(sorted({re.escape(normalise_text(f)) for f in forms}, key=len, reverse=True)) + ")"


def _renderings(template: str) -> list[str]:
    """A template's normalised text in each voice, each value placeholder (an age, a relation) an "x"."""

    def value(match: re.Match[str]) -> str:
        return match.group(0) if "|" in match.group(1) or match.group(1) in _PRONOUNS["first"] else " x "

    values = TOKEN.sub(value, template)
    return [
        normalise_text(fill(values, voice, sex))
        for voice, sex in (("first", "female"), ("third", "female"), ("third", "male"))
    ]


def find_held_out_lines(splits: dict[str, Iterable[Example]], lists: Iterable[HeldOut]) -> dict:
    """Which messages of ``splits`` contain a test-only line, judged on normalised text in every voice.

    A test line whose words also occur inside a line that training or
    validation may use ("breathing is fine" within "lip swollen, breathing is
    fine") is shared wording, not a leak: it is counted as
    ``lines_also_in_training`` and not searched for.
    """
    lists = list(lists)
    usable_by_word: dict[str, list[str]] = defaultdict(list)
    for text in {text for h in lists for line in (*h.train, *h.valid) for text in _renderings(_line_text(line))}:
        for word in set(text.split()):
            usable_by_word[word].append(text)
    patterns, too_short, shared = [], 0, 0
    for h in lists:
        for text in {_line_text(line) for line in h.test} - {_line_text(line) for line in (*h.train, *h.valid)}:
            compiled = _pattern(text)
            anchor = max(normalise_text(TOKEN.sub(" ", text)).split(" "), key=len)
            if compiled is None:
                too_short += 1
            elif any(compiled.search(usable) for usable in usable_by_word[anchor]):
                shared += 1
            else:
                patterns.append((anchor, compiled, h.where, text))
    hits = []
    for part, examples in splits.items():
        for example in examples:
            message = normalise_text(message_of(example.prompt))
            hits += [
                {"split": part, "id": example.id, "list": where, "line": text}
                for anchor, pattern, where, text in patterns
                if anchor in message and pattern.search(message)
            ]
    return {
        "lines_checked": len(patterns),
        "lines_too_short_to_check": too_short,
        "lines_also_in_training": shared,
        "hits": len(hits),
        "examples": hits[:5],
    }


def assert_held_out_clean(report: dict) -> None:
    if report["hits"]:
        first = report["examples"][0]
        raise DataError(
            f"splits/{first['split']}",
            None,
            "prompt",
            f"{report['hits']} training or validation message(s) contain a line held out for the "
            f"wording test, e.g. {first['id']} has {first['line']!r} ({first['list']})",
        )


def conditions_markdown(report: dict) -> str:
    """The data card's section on the two test conditions."""
    cases = report["cases"]
    check = report["held_out_check"]
    rows = "\n".join(f"| {part} | {counts['wording']} | {counts['complaint']} |" for part, counts in cases.items())
    return (
        "\n## Two test conditions\n\n"
        "`wording`: training's complaints in phrasings training never saw. "
        "`complaint`: presentations training never saw.\n\n"
        f"| part | wording | complaint |\n|---|---|---|\n{rows}\n\n"
        f"- Presentations: {report['presentations']['train']} in training, {report['presentations']['valid']} "
        f"held out for validation, {report['presentations']['test']} for test.\n"
        f"- Phrasing lists that lost lines to test: {report['lists_held_out']} ({report['lines_held_out_for_test']} "
        f"lines, share {report['held_out_share']}); too short to spare one: {report['lists_too_short']}. "
        f"Validation has {report['lines_held_out_for_valid']} lines of its own; elsewhere it reuses training lines.\n"
        f"- Held-out check on train and valid messages: {check['hits']} hits over {check['lines_checked']} lines "
        f"searched in every voice; {check['lines_too_short_to_check']} lines too short to search, "
        f"{check['lines_also_in_training']} whose words also occur inside a training line.\n"
        f"- Cases dropped as near-duplicates of another split's message: valid "
        f"{report['dropped_near_duplicates']['valid']}, test {report['dropped_near_duplicates']['test']}.\n"
    )
