"""The two test conditions of the built-in cases: held-out wording and held-out complaints."""

from __future__ import annotations

from dataclasses import replace

import pytest

from triage.data import catalogue, conditions
from triage.data.splits import message_of
from triage.data.synth import DEFAULT_LABEL_MIX, fill
from triage.schema import DataError, render_prompt

SIZES = conditions.Sizes(train=300, wording={"valid": 60, "test": 80}, complaint={"valid": 40, "test": 50})
FRACTIONS = {"train": 0.8, "valid": 0.1, "test": 0.1}
SHARE, SEED = 0.2, 7


@pytest.fixture(scope="module")
def kb() -> catalogue.Knowledge:
    return catalogue.load_knowledge()


@pytest.fixture(scope="module")
def built(kb: catalogue.Knowledge):
    return conditions.build(kb, SIZES, DEFAULT_LABEL_MIX, FRACTIONS, SHARE, SEED)


@pytest.fixture(scope="module")
def wording(kb: catalogue.Knowledge) -> conditions.WordingSplit:
    return conditions.WordingSplit(kb, SHARE, SEED)


def test_partition_sizes_follow_the_list_length() -> None:
    one = conditions.partition_lines(["a b c"], "x", 0.2, 1, min_lines=2)
    assert one.train == one.valid == one.test == ("a b c",)
    two = conditions.partition_lines(["a", "b"], "x", 0.2, 1, min_lines=2)
    assert len(two.train) == len(two.test) == 1 and set(two.train + two.test) == {"a", "b"}
    assert two.valid == two.train  # too short to spare a validation line
    six = conditions.partition_lines(list("abcdef"), "x", 0.2, 1, min_lines=2)
    assert (len(six.train), len(six.valid), len(six.test)) == (4, 1, 1)
    assert not set(six.train) & set(six.valid) and not set(six.train) & set(six.test) and six.valid != six.test
    pool = conditions.partition_lines(["a", "b"], "x", 0.2, 1, min_lines=3)
    assert pool.test == pool.train


def test_partition_depends_on_the_lists_place_not_its_neighbours(
    kb: catalogue.Knowledge, wording: conditions.WordingSplit
) -> None:
    fewer = catalogue.assemble(kb.presentations[1:], kb.modifiers, kb.phrasing)
    again = {held.where: held for held in conditions.WordingSplit(fewer, SHARE, SEED).lists}
    kept = [held for held in wording.lists if not held.where.startswith(f"presentation {kb.presentations[0].id} ")]
    assert kept and all(again[held.where] == held for held in kept)


def test_every_list_of_two_or_more_item_lines_loses_one(wording: conditions.WordingSplit) -> None:
    says = [held for held in wording.lists if held.where.startswith("presentation") and held.where.endswith(" say")]
    assert len(says) >= len(wording.parts["train"].presentations)
    for held in says:
        if len(set(held.train) | set(held.test)) >= 2:
            assert held.test and not set(held.test) & set(held.train), held.where


def test_conditions_hold_the_right_presentations(built) -> None:
    splits, report = built
    train_groups = {e.group for e in splits["train"]}
    assert all("condition" not in e.attrs for e in splits["train"])
    for part in ("valid", "test"):
        by_condition = {c: [e for e in splits[part] if e.attrs["condition"] == c] for c in conditions.CONDITIONS}
        assert len(by_condition["wording"]) + len(by_condition["complaint"]) == len(splits[part])
        assert {e.group for e in by_condition["wording"]} <= train_groups
        assert not {e.group for e in by_condition["complaint"]} & train_groups
        for condition, examples in by_condition.items():
            assert {e.label for e in examples} == {"ED", "GP", "HOME"}, (part, condition)
        assert (
            len(splits[part])
            == sum(getattr(SIZES, c)[part] for c in conditions.CONDITIONS) - report["dropped_near_duplicates"][part]
        )
    valid_complaints = {e.group for e in splits["valid"] if e.attrs["condition"] == "complaint"}
    assert not valid_complaints & {e.group for e in splits["test"] if e.attrs["condition"] == "complaint"}
    assert report["held_out_check"]["hits"] == 0 and report["held_out_check"]["lines_checked"] > 100


def test_wording_test_messages_carry_held_out_lines(built, wording: conditions.WordingSplit) -> None:
    splits, _ = built
    cases = [e for e in splits["test"] if e.attrs["condition"] == "wording"]
    found = conditions.find_held_out_lines({"test": cases}, wording.lists)
    hit_ids = {hit["id"] for hit in conditions.find_held_out_lines({"test": cases}, wording.lists)["examples"]}
    assert hit_ids and found["hits"] >= 0.8 * len(cases)


def test_a_held_out_line_planted_in_training_fails_the_check(built, wording: conditions.WordingSplit) -> None:
    splits, _ = built
    held = next(h for h in wording.held_out() if h.where.endswith(" say") and h.where.startswith("presentation"))
    line = fill(sorted(set(held.test) - set(held.train))[0], "third", "male")
    victim = splits["train"][3]
    planted = replace(victim, prompt=render_prompt(f"{message_of(victim.prompt)} {line}."))
    report = conditions.find_held_out_lines({"train": [*splits["train"][:3], planted]}, wording.lists)
    assert report["hits"] >= 1 and report["examples"][0]["id"] == victim.id
    with pytest.raises(DataError, match=victim.id):
        conditions.assert_held_out_clean(report)
    assert conditions.find_held_out_lines({"train": splits["train"][:4]}, wording.lists)["hits"] == 0


def test_build_is_deterministic_for_a_seed(kb: catalogue.Knowledge, built) -> None:
    again, _ = conditions.build(kb, SIZES, DEFAULT_LABEL_MIX, FRACTIONS, SHARE, SEED)
    assert again == built[0]


def test_card_section_names_both_conditions(built) -> None:
    text = conditions.conditions_markdown(built[1])
    assert "wording" in text and "complaint" in text and "0 hits" in text
