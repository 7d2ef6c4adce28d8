"""Whole messages: knowledge-base minimums, context, denials that fit the complaint, registers and lengths,
no label in a message's form, and the data card's view of them."""

from __future__ import annotations

import random
import re
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from triage.data import catalogue, synth
from triage.data.datacard import data_card, data_card_markdown
from triage.data.splits import DEFAULT_FRACTIONS, check_leakage, message_of, normalise_text, split_by_group
from triage.schema import LABELS, DataError, Example, render_prompt

N_CASES = 1200
SEED = 11
BALANCED = {label: 1.0 for label in LABELS}
# Form-only accuracy may beat always answering the majority label by this much and no more.
FORM_MARGIN = 0.05


@pytest.fixture(scope="module")
def kb() -> catalogue.Knowledge:
    return catalogue.load_knowledge()


@pytest.fixture(scope="module")
def cases(kb: catalogue.Knowledge) -> list[synth.Generated]:
    return synth.generate_cases(N_CASES, BALANCED, SEED, knowledge=kb)


@pytest.fixture(scope="module")
def examples(kb: catalogue.Knowledge) -> list[Example]:
    return synth.generate(N_CASES, BALANCED, SEED, knowledge=kb)


def copy_knowledge(tmp_path: Path) -> Path:
    shutil.copytree(catalogue.KNOWLEDGE_DIR, tmp_path, dirs_exist_ok=True)
    return tmp_path


# --------------------------------------------------------------------------- knowledge-base minimums
def test_at_least_300_presentations_across_all_21_systems(kb: catalogue.Knowledge) -> None:
    assert len(kb.presentations) >= 300
    assert len({p.system for p in kb.presentations}) == 21


def test_every_presentation_has_at_least_6_say(kb: catalogue.Knowledge) -> None:
    short = [p.id for p in kb.presentations if len(p.say) < 6]
    assert not short, f"{len(short)} presentations with fewer than 6 say: {short[:10]}"


def test_every_flag_has_at_least_3_say_and_2_deny(kb: catalogue.Knowledge) -> None:
    short = [f"{p.id}.{f.id}" for p in kb.presentations for f in p.flags if len(f.say) < 3 or len(f.deny) < 2]
    assert not short, f"{len(short)} flags with fewer than 3 say or 2 deny: {short[:10]}"


# --------------------------------------------------------------------------- catalogue validation
def test_context_is_parsed_as_templates(kb: catalogue.Knowledge) -> None:
    with_context = [p for p in kb.presentations if p.context]
    assert with_context and all(isinstance(p.context, tuple) for p in kb.presentations)
    assert all(
        catalogue.template_problem(line, catalogue.PATIENT_TOKENS) is None for p in with_context for line in p.context
    )


def test_bad_context_line_names_file_line_and_field(tmp_path: Path) -> None:
    path = copy_knowledge(tmp_path) / "presentations" / "cardiac.yaml"
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("- id:"))
    at = next(i for i in range(first, len(lines)) if lines[i].startswith("  context:"))
    lines[at + 1] = '    - "{his} chest feels tight"'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        catalogue.load_knowledge(tmp_path)
    assert error.value.path.endswith("cardiac.yaml") and error.value.line == first + 1
    assert error.value.field_name == "context" and "{his}" in str(error.value)


def test_context_line_shared_by_two_presentations_is_rejected(tmp_path: Path, kb: catalogue.Knowledge) -> None:
    first, second = [p for p in kb.presentations if p.system == "cardiac" and p.context][:2]
    path = copy_knowledge(tmp_path) / "presentations" / "cardiac.yaml"
    text = path.read_text()
    assert f'"{second.context[0]}"' in text
    path.write_text(text.replace(f'"{second.context[0]}"', f'"{first.context[0]}"', 1))
    with pytest.raises(DataError, match="duplicate context"):
        catalogue.load_knowledge(tmp_path)


def test_screening_rows_are_validated(tmp_path: Path) -> None:
    path = copy_knowledge(tmp_path) / "systems.yaml"
    original = path.read_text()
    row = next(i for i, line in enumerate(original.splitlines()) if '"no chest pain at all"' in line)
    path.write_text(original.replace('"no chest pain at all"', '"no chest pain in {his} arm"'))
    with pytest.raises(DataError) as error:
        catalogue.load_knowledge(tmp_path)
    assert error.value.path.endswith("systems.yaml") and error.value.line == row + 1
    assert error.value.field_name == "say"
    path.write_text(original.replace("  general:\n", "  gereral:\n"))
    with pytest.raises(DataError, match="gereral"):
        catalogue.load_knowledge(tmp_path)


def test_screening_negation_shared_by_two_systems_is_rejected(tmp_path: Path) -> None:
    path = copy_knowledge(tmp_path) / "systems.yaml"
    path.write_text(path.read_text().replace('"no bleeding or bruising"', '"no fainting"'))
    with pytest.raises(DataError, match="duplicate say"):
        catalogue.load_knowledge(tmp_path)


def _templates(kb: catalogue.Knowledge) -> list[str]:
    """Every phrasing template a message can use, with its owner's values filled in."""
    templates = []
    for p in kb.presentations:
        own = [*p.say, *p.context, *(line for f in p.flags for line in f.say + f.deny)]
        templates += [line.replace("{persists}", p.persists or "") for line in own]
    templates += [line.replace("{persists}", "a week") for m in kb.modifiers for line in m.say]
    phrasing = kb.phrasing
    templates += [row["say"] for rows in phrasing["screening"].values() for row in rows]
    templates += [row["say"] for row in phrasing["distractors"]]
    for group in ("closings", "nurse", "answers", "worries"):
        templates += [line for key, lines in phrasing[group].items() if key != "__line__" for line in lines]
    templates += phrasing["clinician"]["closings"]
    return templates


def test_placeholders_resolve_in_every_voice(kb: catalogue.Knowledge) -> None:
    templates = _templates(kb)
    assert len(templates) > 3000
    for template in templates:
        for voice, sex in (("first", "female"), ("third", "female"), ("third", "male")):
            text = synth.fill(template, voice, sex)
            assert "{" not in text and "}" not in text, (template, voice)


def test_every_flag_can_be_stated(kb: catalogue.Knowledge) -> None:
    # A flag is only ever written into a label at least as urgent as its own, which some band must allow.
    for p in kb.presentations:
        for flag in p.flags:
            assert any(LABELS.index(flag.label) <= LABELS.index(synth.least_urgent(p, band, kb)) for band in p.ages), (
                p.id,
                flag.id,
            )


# --------------------------------------------------------------------------- denials and context
def test_denials_are_own_flags_or_own_system_screening(kb: catalogue.Knowledge, cases: list[synth.Generated]) -> None:
    denied = screened = 0
    for generated in cases:
        case, p = generated.case, generated.case.presentation
        own_flags = {f.id for f in p.flags if f.deny} - set(case.present)
        system_lines = {row["say"] for row in kb.phrasing["screening"][p.system]}
        assert set(case.denied) <= own_flags, (p.id, case.denied)
        assert set(case.screened) <= system_lines, (p.id, case.screened)
        assert set(case.screened) <= set(kb.general[(p.id, case.band, "denials")]), (p.id, case.screened)
        denied += bool(case.denied)
        screened += bool(case.screened)
    assert denied >= 0.15 * len(cases) and screened >= 0.15 * len(cases)


def test_negation_is_no_sign_of_the_label(cases: list[synth.Generated]) -> None:
    share = {
        label: np.mean([bool(g.case.denied or g.case.screened) for g in cases if g.decision.label == label])
        for label in LABELS
    }
    assert 0.4 <= min(share.values()) and max(share.values()) - min(share.values()) <= 0.08, share


def test_screening_never_clashes_with_the_complaint(kb: catalogue.Knowledge) -> None:
    for p in kb.presentations:
        own = " ".join((p.name, *p.say, *p.context, *(s for f in p.flags for s in f.say + f.deny))).lower()
        rows = {row["say"]: row for row in kb.phrasing["screening"][p.system]}
        for band in p.ages:
            for line in kb.general[(p.id, band, "denials")]:
                assert not any(str(stem).lower() in own for stem in rows[line].get("clash", [])), (p.id, line)


def test_messages_add_up_to_three_context_lines(cases: list[synth.Generated]) -> None:
    counts = Counter(len(g.case.context) for g in cases)
    assert set(counts) <= {0, 1, 2, 3} and counts[0] < 0.3 * len(cases) and counts[3] > 0.2 * len(cases)
    assert all(set(g.case.context) <= set(g.case.presentation.context) for g in cases)


def test_context_lines_are_written_into_notes_and_dialogues(kb: catalogue.Knowledge) -> None:
    p = next(p for p in kb.presentations if len(p.context) >= 3 and "adult" in p.ages)
    case = synth.Case(p, "adult", 40 * 52, p.sex or "female", "first", context=p.context[:3])
    lines = [normalise_text(synth.fill(line, "first", case.sex)) for line in case.context]
    for dialogue in (False, True):
        texts = [
            normalise_text(synth.render_message(case, kb, random.Random(seed), dialogue).text) for seed in range(5)
        ]
        assert any(all(line in text for line in lines) for text in texts), (dialogue, texts[0])


def test_context_never_answers_what_a_stated_modifier_answers(
    kb: catalogue.Knowledge, cases: list[synth.Generated]
) -> None:
    checked = 0
    for generated in cases:
        answered = {kb.modifier(m).slot or "history" for m in generated.case.stated}
        assert not {synth.context_slot(line) for line in generated.case.context} & answered
        checked += bool(answered)
    assert checked >= 50


def test_context_lines_go_to_the_nurse_question_they_answer() -> None:
    assert synth.context_slot("it started on Tuesday after the gym") == "duration"
    assert synth.context_slot("{I} {take|takes} tablets for blood pressure") == "history"
    assert synth.context_slot("paracetamol takes the edge off") == "severity"
    assert synth.context_slot("{my} nose is running too") == "symptoms"


def test_context_and_denials_never_change_the_label(kb: catalogue.Knowledge, cases: list[synth.Generated]) -> None:
    for generated in cases[:300]:
        bare = replace(generated.case, denied=(), screened=(), context=(), distractors=())
        assert synth.decide(bare, kb) == generated.decision


# --------------------------------------------------------------------------- registers and length
def test_every_register_writes_in_its_own_voice(cases: list[synth.Generated]) -> None:
    registers = Counter(g.case.register for g in cases)
    assert set(registers) == set(synth.REGISTERS) and min(registers.values()) >= 0.03 * len(cases)
    for generated in cases:
        case = generated.case
        if case.register == "patient":
            assert case.voice == "first"
        if case.register in ("parent", "relative", "clinician"):
            assert case.voice == "third"
        if case.register == "parent":
            assert case.band in ("infant", "child")
        if case.register == "relative":
            assert case.band in ("adult", "pregnant", "elderly")


def test_registers_have_their_form(cases: list[synth.Generated]) -> None:
    notes = [g for g in cases if "\nNurse: " not in g.message.text]
    texts = [g.message.text for g in notes if g.case.register == "text"]
    assert texts and all(t == t.lower() and not re.search(r"[,!?;:']|\.(?!\d)", t) for t in texts)
    clinicians = [g.message.text for g in notes if g.case.register == "clinician"]
    assert clinicians and all(";" in t or ":" in t for t in clinicians if len(t.split()) > 30)
    worried = [g.message.sentences for g in cases if g.case.register == "worried"]
    others = [g.message.sentences for g in cases if g.case.register != "worried"]
    assert np.mean(worried) >= np.mean(others) + 1


def test_messages_spread_over_one_to_six_sentences(examples: list[Example], cases: list[synth.Generated]) -> None:
    notes = Counter(g.message.sentences for g in cases if "\nNurse: " not in g.message.text)
    assert set(notes) == set(range(1, 7)) and min(notes.values()) >= 0.04 * sum(notes.values())
    assert all(
        e.attrs["sentences"] == str(g.message.sentences) and e.attrs["register"] == g.case.register
        for e, g in zip(examples, cases)
    )


def test_every_label_takes_the_same_age_mix(cases: list[synth.Generated]) -> None:
    by_label = {label: Counter(g.case.band for g in cases if g.decision.label == label) for label in LABELS}
    for band in catalogue.AGE_BANDS:
        shares = [by_label[label][band] / sum(by_label[label].values()) for label in LABELS]
        assert max(shares) - min(shares) <= 0.03, (band, shares)


def test_twelve_hundred_cases_take_seconds(kb: catalogue.Knowledge) -> None:
    start = time.perf_counter()
    first = synth.generate(N_CASES, synth.DEFAULT_LABEL_MIX, 5, knowledge=kb)
    elapsed = time.perf_counter() - start
    print(f"\n{N_CASES} cases generated in {elapsed:.2f} s")
    assert elapsed < 10
    assert first == synth.generate(N_CASES, synth.DEFAULT_LABEL_MIX, 5, knowledge=kb)


# --------------------------------------------------------------------------- no label in the form
def _form(example: Example, greeting: re.Pattern[str], closings: frozenset[str]) -> list[float]:
    """What a message looks like, never what it says."""
    text = message_of(example.prompt)
    first_line = re.sub(r"^(Patient|Caller): ", "", text).lower()
    normalised = normalise_text(text)
    return [
        len(text),
        len(text.split()),
        int(example.attrs["sentences"]),
        "\nNurse: " in text,
        bool(greeting.match(first_line)),
        any(normalised.endswith(c) for c in closings),
        *(example.attrs["register"] == register for register in synth.REGISTERS),
    ]


def form_scores(examples: list[Example], kb: catalogue.Knowledge) -> tuple[float, float]:
    """Cross-validated accuracy of form-only classifiers (the better of two), and the majority share."""
    phrasing = kb.phrasing
    # A whole greeting word: "Hi" must not match "His knee" or "Hives".
    greeting = re.compile("|".join(rf"{re.escape(g.lower())}\b" for g in phrasing["greetings"]))
    lines = [c for key, cs in phrasing["closings"].items() if key != "__line__" for c in cs]
    closings = frozenset(
        normalise_text(synth.fill(c, voice, sex))
        for c in lines + phrasing["clinician"]["closings"]
        for voice in ("first", "third")
        for sex in catalogue.SEXES
    )
    features = np.array([_form(e, greeting, closings) for e in examples], dtype=float)
    labels = np.array([e.label for e in examples])
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    models = (
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        DecisionTreeClassifier(max_depth=4, random_state=0),
    )
    best = max(cross_val_score(model, features, labels, cv=folds).mean() for model in models)
    return float(best), max(Counter(labels).values()) / len(labels)


def test_form_does_not_give_the_label_away(examples: list[Example], kb: catalogue.Knowledge) -> None:
    score, majority = form_scores(examples, kb)
    print(f"\nform-only accuracy {score:.3f}, majority {majority:.3f}")
    assert score <= majority + FORM_MARGIN


def test_form_check_catches_a_planted_leak(examples: list[Example], kb: catalogue.Knowledge) -> None:
    closing = kb.phrasing["closings"]["first"][0]
    planted = [
        Example(
            e.id,
            render_prompt(f"{message_of(e.prompt)} {closing}"),
            e.completion,
            e.label,
            e.group,
            {**e.attrs, "sentences": str(int(e.attrs["sentences"]) + 1)},
        )
        if e.label == "ED"
        else e
        for e in examples
    ]
    score, majority = form_scores(planted, kb)
    assert score > majority + FORM_MARGIN


# --------------------------------------------------------------------------- data card
def test_data_card_shows_the_knowledge_base_registers_lengths_and_rules(
    examples: list[Example], kb: catalogue.Knowledge
) -> None:
    splits = split_by_group(examples, DEFAULT_FRACTIONS, SEED)
    card = data_card(splits, check_leakage(splits), knowledge=kb)
    summary = card["knowledge"]
    assert sum(row["presentations"] for row in summary["systems"].values()) == len(kb.presentations)
    for system, row in summary["systems"].items():
        assert sum(row["base"].values()) == row["presentations"]
        assert {label for label, n in row["base"].items() if n} <= set(row["reachable"]), system
    assert set(summary["phrasings"]) == {"say", "context", "flag say", "flag deny", "screening (per system)"}
    assert summary["phrasings"]["say"]["min"] == min(len(p.say) for p in kb.presentations)
    labels = Counter(e.label for e in examples)
    assert {label: sum(kinds.values()) for label, kinds in card["rules"].items()} == labels
    assert card["rules"]["HOME"]["flag"] == card["rules"]["HOME"]["modifier"] == 0
    assert sum(row["total"] for row in card["registers"].values()) == len(examples)
    lengths = card["message_length"]
    assert set(lengths["sentences"]) == set(lengths["words"]) == {"all", *LABELS}
    for name, histogram in lengths["sentences"].items():
        expected = len(examples) if name == "all" else labels[name]
        assert sum(histogram.values()) == expected
    markdown = data_card_markdown(card)
    for heading in ("## Knowledge base", "## Registers", "## Message length", "## Rules", "## Leakage"):
        assert heading in markdown
    assert "| clinician" in markdown and "| flag deny" in markdown


def test_data_card_of_imported_cases_has_no_knowledge_section() -> None:
    rows = [
        Example(f"x{i}", render_prompt("Sore throat. Two days."), label, label, group=f"g{i}")
        for i, label in enumerate(LABELS * 10)
    ]
    splits = {"train": rows[:20], "valid": rows[20:25], "test": rows[25:]}
    card = data_card(splits, check_leakage(splits))
    assert "knowledge" not in card and "registers" not in card
    assert card["message_length"]["sentences"]["all"] == {"2": 30}
