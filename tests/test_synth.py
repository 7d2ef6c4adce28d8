"""Tests for the synthetic triage set: knowledge base, rules, generator, splits, leakage, data card."""

from __future__ import annotations

import random
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from triage.data import catalogue, synth
from triage.data.datacard import approx_tokens, data_card, data_card_markdown
from triage.data.splits import (
    DEFAULT_FRACTIONS,
    LeakageError,
    SplitError,
    assert_no_leakage,
    check_leakage,
    groups_of,
    message_of,
    normalise_text,
    split_by_group,
)
from triage.schema import LABELS, DataError, Example, label_of, render_prompt

N_DEFAULT = 1200
SEED = 42
# A representative age per band that triggers no inherent modifier (infants: 9 months).
NEUTRAL_WEEKS = {"infant": 39, "child": 8 * 52, "adult": 40 * 52, "pregnant": 30 * 52, "elderly": 80 * 52}


@pytest.fixture(scope="module")
def kb() -> catalogue.Knowledge:
    return catalogue.load_knowledge()


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return synth.generate(N_DEFAULT, synth.DEFAULT_LABEL_MIX, SEED)


@pytest.fixture(scope="module")
def splits(examples: list[Example]) -> dict[str, list[Example]]:
    return split_by_group(examples, DEFAULT_FRACTIONS, SEED)


def make_case(kb: catalogue.Knowledge, presentation_id: str, band: str | None = None, **facts) -> synth.Case:
    p = kb.presentation(presentation_id)
    band = band or next((b for b in ("adult", "child", "elderly") if b in p.ages), p.ages[0])
    defaults = {
        "age_weeks": NEUTRAL_WEEKS[band],
        "sex": p.sex or "female",
        "voice": "first",
        "gestation": 30 if band == "pregnant" else None,
    }
    return synth.Case(presentation=p, band=band, **{**defaults, **facts})


def message(example: Example) -> str:
    return message_of(example.prompt)


# --------------------------------------------------------------------------- knowledge base
def test_knowledge_base_is_broad(kb: catalogue.Knowledge) -> None:
    assert len(kb.presentations) >= 150
    assert len({p.system for p in kb.presentations}) >= 15
    assert {p.base for p in kb.presentations} == set(LABELS)
    assert {band for p in kb.presentations for band in p.ages} == set(catalogue.AGE_BANDS)
    assert sum(bool(p.flags) for p in kb.presentations) >= 120


def test_fever_tag_is_backed_by_the_wording(kb: catalogue.Knowledge) -> None:
    # Fever modifiers fire on the tag, so every phrasing of a tagged complaint must mention fever.
    fever_words = re.compile(r"fever|temperature|38|39|burning hot|feverish")
    for p in kb.presentations:
        if "fever" in p.tags:
            assert all(fever_words.search(s) for s in p.say), p.id


def test_knowledge_errors_name_file_line_and_field(tmp_path: Path) -> None:
    shutil.copytree(catalogue.KNOWLEDGE_DIR, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "presentations" / "cardiac.yaml"
    lines = path.read_text().splitlines()
    base_line = next(i for i, line in enumerate(lines) if line.strip() == "base: GP")
    start = max(i for i in range(base_line) if lines[i].startswith("- id:"))
    lines[base_line] = "  base: URGENT"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        catalogue.load_knowledge(tmp_path)
    assert error.value.path.endswith("cardiac.yaml")
    assert error.value.line == start + 1
    assert error.value.field_name == "base"
    assert "URGENT" in str(error.value)


def test_knowledge_rejects_wording_shared_by_two_presentations(tmp_path: Path, kb: catalogue.Knowledge) -> None:
    shutil.copytree(catalogue.KNOWLEDGE_DIR, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "presentations" / "cardiac.yaml"
    first, second = kb.presentations[0].say[0], kb.presentations[1].say[0]
    path.write_text(path.read_text().replace(f'"{second}"', f'"{first}"', 1))
    with pytest.raises(DataError, match="duplicate say"):
        catalogue.load_knowledge(tmp_path)


# --------------------------------------------------------------------------- rules
def test_each_flag_sets_at_least_its_label(kb: catalogue.Knowledge) -> None:
    for p in kb.presentations:
        for flag in p.flags:
            decision = synth.decide(make_case(kb, p.id, present=(flag.id,)), kb)
            assert decision.label == LABELS[min(LABELS.index(p.base), LABELS.index(flag.label))], (p.id, flag.id)
            if flag.label != p.base:
                assert decision.rule == flag.id and decision.reason == flag.reason


def test_negations_and_context_never_escalate(kb: catalogue.Knowledge) -> None:
    checked = 0
    for p in kb.presentations:
        screening = kb.general[(p.id, p.ages[0], "denials")]
        for flag in p.flags:
            if flag.deny:
                case = make_case(kb, p.id, denied=(flag.id,), screened=screening, context=p.context)
                assert synth.decide(case, kb) == synth.decide(make_case(kb, p.id), kb), (p.id, flag.id)
                assert synth.decide(replace(case, present=(flag.id,)), kb).label == flag.label
                checked += 1
    assert checked >= 100


def test_denied_flags_are_written_into_the_message(kb: catalogue.Knowledge) -> None:
    case = make_case(kb, "chest_pain_exertional", present=(), denied=("pain_at_rest", "exertional_sweating"))
    denials = {
        normalise_text(synth.fill(s, "first", "female"))
        for f in ("pain_at_rest", "exertional_sweating")
        for s in case.presentation.flag(f).deny
    }
    texts = [normalise_text(synth.render_message(case, kb, random.Random(seed)).text) for seed in range(5)]
    assert any(sum(d in text for d in denials) == 2 for text in texts)
    assert synth.decide(case, kb).label == "GP"


def test_same_complaint_takes_all_three_labels_by_modifier(kb: catalogue.Knowledge) -> None:
    assert synth.decide(make_case(kb, "headache"), kb).label == "HOME"
    assert synth.decide(make_case(kb, "headache", stated=("persisting",)), kb).label == "GP"
    assert synth.decide(make_case(kb, "headache", band="pregnant"), kb).rule == "pregnancy_headache"
    thunderclap = synth.decide(make_case(kb, "headache", present=("thunderclap",)), kb)
    assert (thunderclap.label, thunderclap.rule) == ("ED", "thunderclap")


@pytest.mark.parametrize(
    ("presentation", "band", "facts", "label", "rule"),
    [
        ("child_fever", "infant", {"age_weeks": 6}, "ED", "infant_under_3_months_fever"),
        ("child_fever", "infant", {"age_weeks": 12}, "ED", "infant_under_3_months_fever"),
        ("child_fever", "infant", {"age_weeks": 17}, "GP", "infant_3_to_6_months_fever"),
        ("child_fever", "infant", {"age_weeks": 39}, "HOME", "base"),
        ("child_fever", "child", {}, "HOME", "base"),
        ("flu_like_illness", "adult", {"stated": ("immunosuppressed_fever",)}, "ED", "immunosuppressed_fever"),
        ("flu_like_illness", "adult", {}, "HOME", "base"),
        ("head_bump", "elderly", {"stated": ("anticoagulated_head_injury",)}, "ED", "anticoagulated_head_injury"),
        ("gallstone_pain", "pregnant", {}, "ED", "pregnancy_abdominal_pain"),
        ("cystitis_female", "pregnant", {}, "GP", "pregnancy_needs_review"),
        (
            "diarrhoea_vomiting_adult",
            "adult",
            {"stated": ("type1_diabetes_vomiting",)},
            "ED",
            "type1_diabetes_vomiting",
        ),
        ("ankle_sprain", "adult", {"stated": ("severe_pain",)}, "GP", "severe_pain"),
        # A stated modifier that does not fit the complaint changes nothing.
        ("sore_throat", "adult", {"stated": ("anticoagulated_head_injury",)}, "HOME", "base"),
        # A modifier that does not raise the label leaves the base reason in place.
        ("bronchiolitis", "infant", {"age_weeks": 17}, "GP", "base"),
        ("gout", "adult", {"stated": ("severe_pain",)}, "GP", "base"),
    ],
)
def test_red_flag_modifiers(
    kb: catalogue.Knowledge, presentation: str, band: str, facts: dict, label: str, rule: str
) -> None:
    decision = synth.decide(make_case(kb, presentation, band=band, **facts), kb)
    assert (decision.label, decision.rule) == (label, rule)


def test_generated_infant_fevers_follow_the_age_rule(kb: catalogue.Knowledge, examples: list[Example]) -> None:
    fever_ids = {p.id for p in kb.presentations if "fever" in p.tags}
    young = 0
    for example in examples:
        weeks = re.search(r"\b(\d+) weeks? old", message(example))
        if example.group in fever_ids and example.attrs["age_band"] == "infant" and weeks:
            assert int(weeks.group(1)) < 13 and example.label == "ED", message(example)
            young += 1
    assert young >= 1
    assert all(e.label == "ED" for e in examples if e.attrs["rule"] == "infant_under_3_months_fever")


def test_generated_immunosuppressed_fevers_are_ed(kb: catalogue.Knowledge, examples: list[Example]) -> None:
    modifier = kb.modifier("immunosuppressed_fever")
    fever_ids = {p.id for p in kb.presentations if "fever" in p.tags}
    phrases = {
        normalise_text(synth.fill(s, voice, sex))
        for s in modifier.say
        for voice in ("first", "third")
        for sex in catalogue.SEXES
    }
    mentioned = [
        e for e in examples if e.group in fever_ids and any(phrase in normalise_text(message(e)) for phrase in phrases)
    ]
    assert mentioned and all(e.label == "ED" for e in mentioned)


# --------------------------------------------------------------------------- generator
def test_generate_is_deterministic_for_a_seed() -> None:
    first = synth.generate(150, synth.DEFAULT_LABEL_MIX, seed=7)
    assert first == synth.generate(150, synth.DEFAULT_LABEL_MIX, seed=7)
    assert [e.prompt for e in first] != [e.prompt for e in synth.generate(150, synth.DEFAULT_LABEL_MIX, seed=8)]


@pytest.mark.parametrize("mix", [synth.DEFAULT_LABEL_MIX, {"ED": 0.5, "GP": 0.2, "HOME": 0.3}, {"GP": 1, "HOME": 1}])
def test_label_mix_is_met(mix: dict[str, float]) -> None:
    generated = synth.generate(300, mix, seed=3)
    counts = Counter(e.label for e in generated)
    total = sum(mix.values())
    for label in LABELS:
        assert abs(counts[label] / len(generated) - mix.get(label, 0) / total) <= 0.01, (label, counts)


def test_default_mix_matches_at_default_size(examples: list[Example]) -> None:
    counts = Counter(e.label for e in examples)
    assert len(examples) == N_DEFAULT
    assert counts["GP"] > counts["ED"] and counts["GP"] > counts["HOME"]
    for label, share in synth.DEFAULT_LABEL_MIX.items():
        assert abs(counts[label] / N_DEFAULT - share) <= 0.01


def test_default_size_covers_presentations_and_every_age_group(
    kb: catalogue.Knowledge, examples: list[Example]
) -> None:
    assert len({e.group for e in examples}) >= 150
    assert len({e.attrs["system"] for e in examples}) >= 15
    by_band = Counter((e.attrs["age_band"], e.label) for e in examples)
    for band in catalogue.AGE_BANDS:
        assert sum(n for (b, _), n in by_band.items() if b == band) >= 30, band
        assert all(by_band[(band, label)] > 0 for label in LABELS), band
    assert {e.attrs["sex"] for e in examples} == set(catalogue.SEXES)


def test_examples_follow_the_contract(kb: catalogue.Knowledge, examples: list[Example]) -> None:
    assert [e.id for e in examples] == [f"b{i:06d}" for i in range(len(examples))]
    systems = {p.system for p in kb.presentations}
    for example in examples:
        assert example.prompt == render_prompt(message(example))
        assert label_of(example.completion) == example.label
        assert re.fullmatch(rf"{example.label} - \S.+", example.completion)
        assert "\n" not in example.completion
        assert example.group == example.attrs["presentation"]
        assert set(example.attrs) == {
            "age_band",
            "sex",
            "system",
            "presentation",
            "rule",
            "negation",
            "register",
            "sentences",
        }
        assert example.attrs["register"] in synth.REGISTERS and 1 <= int(example.attrs["sentences"]) <= 12
        assert example.attrs["age_band"] in catalogue.AGE_BANDS and example.attrs["sex"] in catalogue.SEXES
        assert example.attrs["system"] in systems
        assert example.attrs["age_band"] != "pregnant" or example.attrs["sex"] == "female"
    assert len({normalise_text(message(e)) for e in examples}) == len(examples)


def test_messages_vary_in_form(examples: list[Example]) -> None:
    texts = [message(e) for e in examples]
    dialogues = [t for t in texts if "\nNurse: " in t]
    assert abs(len(dialogues) / len(texts) - 0.3) <= 0.05
    assert all(
        re.match(r"(Patient|Caller): ", line) or line.startswith("Nurse: ") for t in dialogues for line in t.split("\n")
    )
    lengths = sorted(approx_tokens(t) for t in texts)
    assert lengths[0] <= 30 and lengths[-1] >= 120
    assert sum(e.attrs["negation"] == "yes" for e in examples) >= 0.2 * len(examples)
    assert sum(t == t.lower() for t in texts) >= 0.05 * len(texts)  # texting style
    assert any(re.search(r"\b(she|he)\b", t) for t in texts) and any(re.search(r"\bI\b", t) for t in texts)


def test_label_counts_use_largest_remainder() -> None:
    assert synth.label_counts(7, {"ED": 1, "GP": 1, "HOME": 1}) == {"ED": 3, "GP": 2, "HOME": 2}
    assert synth.label_counts(10, synth.DEFAULT_LABEL_MIX) == {"ED": 3, "GP": 5, "HOME": 2}
    assert synth.label_counts(5, {"HOME": 2, "ED": 2}) == {"ED": 3, "GP": 0, "HOME": 2}


def test_generate_never_repeats_a_message(kb: catalogue.Knowledge) -> None:
    # One plain presentation asked for many times: only de-duplication keeps every text new.
    single = replace(kb, presentations=(kb.presentation("cold_sore"),))
    generated = synth.generate(300, {"HOME": 1}, seed=5, knowledge=single)
    assert len({normalise_text(message(e)) for e in generated}) == 300


def test_generate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown labels"):
        synth.generate(10, {"URGENT": 1.0}, seed=1)
    with pytest.raises(ValueError, match="dialogue_share"):
        synth.generate(10, synth.DEFAULT_LABEL_MIX, seed=1, dialogue_share=1.5)


# --------------------------------------------------------------------------- splits
def test_splits_keep_groups_apart_and_hold_every_label(
    examples: list[Example], splits: dict[str, list[Example]]
) -> None:
    assert list(splits) == list(DEFAULT_FRACTIONS)
    assert sorted(e.id for part in splits.values() for e in part) == sorted(e.id for e in examples)
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not groups_of(splits[a]) & groups_of(splits[b]), (a, b)
    for name, part in splits.items():
        assert {e.label for e in part} == set(LABELS), name
        assert abs(len(part) / len(examples) - DEFAULT_FRACTIONS[name]) <= 0.03, name
        labels = Counter(e.label for e in part)
        for label in LABELS:
            assert abs(labels[label] / len(part) - synth.DEFAULT_LABEL_MIX[label]) <= 0.08, (name, label)


def test_split_is_deterministic(examples: list[Example], splits: dict[str, list[Example]]) -> None:
    assert split_by_group(examples, DEFAULT_FRACTIONS, SEED) == splits


def test_split_moves_a_small_group_into_a_split_missing_a_class() -> None:
    # HOME only occurs inside three large mixed groups, which greedy placement puts in train.
    rows = [
        Example(id=f"m{g}-{j}", prompt="p", completion=label, label=label, group=f"mixed{g}")
        for g in range(3)
        for j, label in enumerate(["HOME"] + ["GP"] * 20)
    ]
    rows += [
        Example(id=f"p{g}-{j}", prompt="p", completion=label, label=label, group=f"pure{g}")
        for g in range(40)
        for j, label in enumerate(["ED", "GP", "GP"])
    ]
    parts = split_by_group(rows, DEFAULT_FRACTIONS, seed=0)
    assert all(Counter(e.label for e in part)["HOME"] == 1 for part in parts.values())


def test_split_names_the_split_and_class_it_cannot_fill() -> None:
    rows = [
        Example(id=f"x{i}", prompt=f"p{i}", completion=label, label=label, group=f"g{i % 10}")
        for i, label in enumerate(["ED", "GP"] * 20)
    ]
    rows.append(Example(id="home", prompt="p", completion="HOME", label="HOME", group="only-home"))
    with pytest.raises(SplitError) as error:
        split_by_group(rows, DEFAULT_FRACTIONS, seed=0)
    assert error.value.label == "HOME" and error.value.split in DEFAULT_FRACTIONS
    assert f"split '{error.value.split}'" in str(error.value) and "HOME" in str(error.value)


# --------------------------------------------------------------------------- leakage
def test_generated_splits_have_no_leakage(splits: dict[str, list[Example]]) -> None:
    report = check_leakage(splits, near_duplicate_threshold=0.9)
    assert (report["exact"], report["near"], report["threshold"]) == (0, 0, 0.9)
    assert_no_leakage(report)


def test_different_presentations_never_near_duplicate(examples: list[Example]) -> None:
    by_group: dict[str, list[Example]] = {}
    for example in examples:
        by_group.setdefault(example.group, []).append(example)
    report = check_leakage(by_group, near_duplicate_threshold=0.8)
    assert (report["exact"], report["near"]) == (0, 0), report["examples"]


def _plant(target: list[Example], source: Example, text: str, new_id: str) -> list[Example]:
    return [*target, replace(source, id=new_id, prompt=render_prompt(text))]


def test_leakage_detects_planted_exact_and_near_duplicates(splits: dict[str, list[Example]]) -> None:
    source = max(splits["train"][:200], key=lambda e: len(message(e)))
    text = message(source)
    exact_copy = text.upper().replace(".", " !")  # same words, different case and punctuation
    middle = len(text) // 2 + next(i for i, ch in enumerate(text[len(text) // 2 :]) if ch.isalpha())
    near_copy = text[:middle] + ("x" if text[middle] != "x" else "y") + text[middle + 1 :]
    with_exact = {**splits, "test": _plant(splits["test"], source, exact_copy, "planted-exact")}
    report = check_leakage(with_exact)
    assert (report["exact"], report["near"]) == (1, 0)
    assert report["examples"][0]["b"]["id"] == "planted-exact"
    with_near = {**splits, "valid": _plant(splits["valid"], source, near_copy, "planted-near")}
    report = check_leakage(with_near)
    assert (report["exact"], report["near"]) == (0, 1)
    assert 0.9 <= report["examples"][0]["similarity"] < 1
    with pytest.raises(LeakageError, match="planted-near"):
        assert_no_leakage(report)
    assert check_leakage(with_near, near_duplicate_threshold=0.999)["near"] == 0


# --------------------------------------------------------------------------- data card
def test_data_card_counts_add_up(splits: dict[str, list[Example]]) -> None:
    report = check_leakage(splits)
    card = data_card(splits, report)
    total = sum(len(part) for part in splits.values())
    assert card["total"] == total == N_DEFAULT
    for name, part in splits.items():
        assert card["splits"][name]["examples"] == len(part) == sum(card["splits"][name]["by_label"].values())
        assert card["splits"][name]["groups"] == len(groups_of(part))
    for table in (card["systems"], *card["subgroups"].values()):
        assert sum(row["total"] for row in table.values()) == total
        for name, part in splits.items():
            assert sum(row["by_split"][name] for row in table.values()) == len(part)
        for label in LABELS:
            assert sum(row["by_label"][label] for row in table.values()) == sum(
                card["splits"][name]["by_label"][label] for name in splits
            )
        assert all(
            sum(row["by_split"].values()) == sum(row["by_label"].values()) == row["total"] for row in table.values()
        )
    assert set(card["subgroups"]) == {"age_band", "sex"}
    for stats in (s for by_field in card["lengths"]["by_split"].values() for s in by_field.values()):
        assert 0 < stats["min"] <= stats["median"] <= stats["p95"] <= stats["max"]
    assert "approximate" in card["lengths"]["unit"]
    assert card["leakage"]["clean"] and card["leakage"]["exact"] == 0
    markdown = data_card_markdown(card)
    assert "approximate" in markdown and "| split" in markdown and "**clean**" in markdown
    assert all(name in markdown for name in splits)
    assert f"| {next(iter(card['systems']))}" in markdown
