"""The built-in synthetic triage set.

Three steps, each deterministic given its inputs (randomness comes from a passed-in generator):

1. ``load_knowledge`` (:mod:`triage.data.catalogue`) reads the YAML knowledge
   base in ``triage/data/knowledge/``: presentations with their red-flag
   discriminators, host modifiers (age, pregnancy, immunosuppression, ...) and
   general phrasing.
2. ``decide`` labels a ``Case`` (a presentation plus the facts stated about
   the patient) with explicit rules: the most urgent of the base label, every
   stated flag and every applicable modifier. Negated flags count for nothing.
3. ``render_message`` writes the case as a first-person lay message or a short
   patient-nurse dialogue, with varied wording, distractors and typos.

``generate`` ties them together for a requested size and label mix. The data
are synthetic and not for clinical use (see ``triage/data/knowledge/README.md``).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from triage.data.catalogue import SEXES, TOKEN, Knowledge, Modifier, Presentation, age_choices, load_knowledge
from triage.data.splits import normalise_text
from triage.schema import LABELS, Example, render_prompt

DEFAULT_LABEL_MIX: dict[str, float] = {"ED": 0.30, "GP": 0.45, "HOME": 0.25}
"""Roughly the shape of telephone-triage outcomes: GP-level advice most often."""

# How often patients write about themselves rather than a parent, partner or carer writing for them.
_FIRST_PERSON_SHARE = {"child": 0.3, "adult": 0.85, "pregnant": 0.9, "elderly": 0.55}
_MAX_TRIES = 40

_PRONOUNS: dict[str, dict[str, str]] = {
    "first": {"I": "I", "me": "me", "my": "my", "myself": "myself", "I'm": "I'm", "I've": "I've",
              "I'd": "I'd", "you": "you", "your": "your", "you're": "you're"},
    "female": {"I": "she", "me": "her", "my": "her", "myself": "herself", "I'm": "she's",
               "I've": "she's", "I'd": "she'd", "you": "she", "your": "her", "you're": "she's"},
    "male": {"I": "he", "me": "him", "my": "his", "myself": "himself", "I'm": "he's",
             "I've": "he's", "I'd": "he'd", "you": "he", "your": "his", "you're": "he's"},
}

# Typos never touch negations: a misspelt "not" could flip a message's meaning.
_PROTECTED_WORDS = frozenset({"no", "not", "never", "nothing", "none", "nor", "without"})
_MISSPELLINGS = {
    "definitely": "definately", "really": "realy", "because": "becuase", "stomach": "stomache",
    "temperature": "temprature", "breathe": "breath", "diarrhoea": "diarhoea", "tonight": "tonite",
    "painful": "painfull", "swollen": "swolen", "feeling": "feelin", "headache": "headach",
    "tired": "tierd", "probably": "prob", "tomorrow": "tomorow", "which": "wich",
    "breathing": "breathin", "vomiting": "vomitting", "bleeding": "bleding",
}


@dataclass(frozen=True)
class Case:
    """Everything that decides a label: the complaint and the facts stated about the patient.

    ``present`` are flags the message states, ``denied`` flags it explicitly
    negates, ``stated`` host modifiers it mentions and ``extra_denials``
    general negations from the phrasing file ("no chest pain").
    """

    presentation: Presentation
    band: str
    age_weeks: int
    sex: str
    voice: str
    gestation: int | None = None
    present: tuple[str, ...] = ()
    denied: tuple[str, ...] = ()
    stated: tuple[str, ...] = ()
    extra_denials: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """A case's label, the id of the rule that set it and a one-line reason."""

    label: str
    rule: str
    reason: str




def _urgency(label: str) -> int:
    """Smaller is more urgent, following the order of ``LABELS``."""
    return LABELS.index(label)


def _expand(text: str, presentation: Presentation) -> str:
    return text.replace("{name}", presentation.name).replace("{persists}", presentation.persists or "")


def modifier_applies(modifier: Modifier, case: Case) -> bool:
    """Whether a host modifier's conditions (tags, age band, infant age) hold for a case."""
    if not modifier.tags_any & case.presentation.tags:
        return False
    if modifier.bands and case.band not in modifier.bands:
        return False
    if modifier.min_weeks is not None and case.age_weeks < modifier.min_weeks:
        return False
    return modifier.max_weeks is None or case.age_weeks < modifier.max_weeks


def decide(case: Case, knowledge: Knowledge) -> Decision:
    """Label a case: the most urgent of its base, stated flags and applicable modifiers.

    Denied flags and general negations are deliberately ignored. On equal
    urgency a stated flag gives the reason, then the base, then a stated and
    finally an inherent modifier: a modifier only explains a label it raised.
    """
    p = case.presentation
    options = [(_urgency(p.base), 1, "base", p.reason)]
    for flag_id in case.present:
        flag = p.flag(flag_id)
        options.append((_urgency(flag.label), 0, flag.id, flag.reason))
    for modifier in knowledge.modifiers:
        if (not modifier.stated or modifier.id in case.stated) and modifier_applies(modifier, case):
            options.append((_urgency(modifier.label), 2 if modifier.stated else 3, modifier.id,
                            _expand(modifier.reason, p)))
    urgency, _, rule, reason = min(options, key=lambda option: option[:2])
    return Decision(LABELS[urgency], rule, reason)


def _routes(p: Presentation, label: str, knowledge: Knowledge) -> list[tuple[str, str]]:
    """Ways a presentation can reach a label: its base, a flag, or a modifier."""
    routes = [("base", "")] if p.base == label else []
    if _urgency(label) < _urgency(p.base):
        routes += [("flag", f.id) for f in p.flags if f.label == label]
        routes += [("modifier", m.id) for m in knowledge.modifiers
                   if m.label == label and m.tags_any & p.tags and (not m.bands or set(m.bands) & set(p.ages))]
    return routes


def _sample_case(p: Presentation, label: str, route: tuple[str, str], knowledge: Knowledge,
                 rng: random.Random) -> Case | None:
    """Draw patient facts that realise ``route``; None when the route proves infeasible."""
    kind, ref = route
    modifier = knowledge.modifier(ref) if kind == "modifier" else None
    bands = [b for b in p.ages if modifier is None or not modifier.bands or b in modifier.bands]
    bounds = (modifier.min_weeks or 0, modifier.max_weeks) if modifier and not modifier.stated else (0, None)
    for _ in range(_MAX_TRIES):
        band = rng.choice(bands)
        ages = age_choices(p, band, *bounds)
        if not ages:
            continue
        age_weeks = rng.choice(ages)
        present = _pick_flags(p, label, ref if kind == "flag" else None, rng)
        case = Case(
            presentation=p,
            band=band,
            age_weeks=age_weeks,
            sex="female" if band == "pregnant" else p.sex or rng.choice(SEXES),
            voice=_pick_voice(p, band, age_weeks, rng),
            gestation=rng.randint(*p.gestation) if band == "pregnant" else None,
            present=present,
            denied=tuple(f.id for f in p.flags if f.deny and f.id not in present and rng.random() < 0.3)[:2],
            stated=_pick_stated(p, band, label, modifier if modifier and modifier.stated else None, knowledge, rng),
            extra_denials=_pick_general(knowledge.general[(p.id, band, "denials")], rng),
        )
        if decide(case, knowledge).label == label:
            return case
    return None


def _pick_voice(p: Presentation, band: str, age_weeks: int, rng: random.Random) -> str:
    """Whether the patient writes (first person) or someone writes about them (third)."""
    if p.voice:
        return p.voice
    # Babies and children under 13 do not write in; a parent writes about them.
    if band == "infant" or (band == "child" and age_weeks < 13 * 52):
        return "third"
    return "first" if rng.random() < _FIRST_PERSON_SHARE[band] else "third"


def _pick_flags(p: Presentation, label: str, required: str | None, rng: random.Random) -> tuple[str, ...]:
    """The required flag plus, sometimes, up to two others that do not raise the label."""
    extras = [f.id for f in p.flags if f.id != required and _urgency(f.label) >= _urgency(label)
              and rng.random() < 0.2]
    return tuple(([required] if required else []) + extras[:2])


def _pick_stated(p: Presentation, band: str, label: str, required: Modifier | None, knowledge: Knowledge,
                 rng: random.Random) -> tuple[str, ...]:
    """The required stated modifier plus, rarely, optional ones that do not raise the label."""
    extras = [m.id for m in knowledge.modifiers
              if m.stated and m.optional and m is not required and m.tags_any & p.tags
              and (not m.bands or band in m.bands) and _urgency(m.label) >= _urgency(label)
              and rng.random() < 0.12]
    return tuple(([required.id] if required else []) + extras)


def _pick_general(denials: Sequence[str], rng: random.Random) -> tuple[str, ...]:
    if not denials or rng.random() >= 0.3:
        return ()
    return tuple(rng.sample(list(denials), k=min(len(denials), 1 + (rng.random() < 0.3))))


def fill(template: str, voice: str, sex: str, extra: dict[str, str] | None = None) -> str:
    """Resolve placeholders for the writer's point of view and the patient's sex."""
    forms = _PRONOUNS["first" if voice == "first" else sex]

    def substitute(match: re.Match[str]) -> str:
        key = match.group(1)
        if "|" in key:
            first, third = key.split("|", 1)
            return first if voice == "first" else third
        if extra and key in extra:
            return extra[key]
        return forms[key]

    return TOKEN.sub(substitute, template)


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless it starts with the pronoun I."""
    if re.match(r"I\b", text):
        return text
    return text[:1].lower() + text[1:]


def _add_typos(text: str, rng: random.Random, rate: float) -> str:
    """Realistic slips: common misspellings, swapped, dropped or doubled letters."""

    def slip(match: re.Match[str]) -> str:
        word = match.group(0)
        if rng.random() >= rate or word.lower() in _PROTECTED_WORDS:
            return word
        if word.lower() in _MISSPELLINGS:
            return _MISSPELLINGS[word.lower()]
        if len(word) < 5:
            return word
        i = rng.randrange(1, len(word) - 2)
        operation = rng.choice(("swap", "drop", "double"))
        if operation == "swap":
            return word[:i] + word[i + 1] + word[i] + word[i + 2:]
        if operation == "drop":
            return word[:i] + word[i + 1:]
        return word[:i] + word[i] + word[i:]

    return re.sub(r"[A-Za-z]+", slip, text)


def _age_text(case: Case, rng: random.Random) -> tuple[str, str]:
    """The age as a bare number and as words with units ("6 weeks old")."""
    if case.band == "infant":
        if case.age_weeks < 13:
            unit = "week" if case.age_weeks == 1 else "weeks"
            return str(case.age_weeks), f"{case.age_weeks} {unit} old"
        months = round(case.age_weeks * 12 / 52)
        return str(months), f"{months} months old"
    years = case.age_weeks // 52
    return str(years), rng.choice((str(years), f"{years} years old"))


def _intro(case: Case, phrasing: dict[str, Any], rng: random.Random) -> str | None:
    """Who the message is about; always present when the rules depend on age or pregnancy."""
    needed = case.voice == "third" or case.band in ("infant", "pregnant", "child")
    optional_share = {"adult": 0.5, "elderly": 0.8}.get(case.band, 1.0)
    if not needed and rng.random() >= optional_share:
        return None
    age, age_text = _age_text(case, rng)
    pregnant = case.band == "pregnant"
    key = ("first" if case.voice == "first" else "third") + ("_pregnant" if pregnant else "")
    relations = phrasing["relations"][case.band][case.sex]
    values = {
        "age": age,
        "age_text": age_text,
        "gest": str(case.gestation),
        "rel": rng.choice(relations),
        "noun": rng.choice(phrasing["nouns"].get(case.band, {}).get(case.sex, ["person"])),
        "sexword": rng.choice(phrasing["sexwords"][case.sex]),
    }
    return fill(rng.choice(phrasing["intros"][key]), case.voice, case.sex, values)


@dataclass
class _Parts:
    """The sentences of one message before they are arranged as a note or a dialogue."""

    opening: list[str]
    complaint: str
    findings: list[str]
    slots: dict[str, list[str]]
    denials: list[str]
    distractor: str | None
    closing: str | None


def _parts(case: Case, knowledge: Knowledge, rng: random.Random) -> _Parts:
    p, phrasing = case.presentation, knowledge.phrasing
    say: Callable[[str], str] = functools.partial(fill, voice=case.voice, sex=case.sex,
                                                  extra={"persists": p.persists or ""})
    verbosity = rng.choices(("short", "medium", "long"), weights=(0.3, 0.45, 0.25))[0]
    greet, chatty, close = {"short": (0.15, 0.0, 0.3), "medium": (0.5, 0.35, 0.6), "long": (0.8, 0.85, 0.9)}[verbosity]
    opening = [rng.choice(phrasing["greetings"]) + rng.choice((",", ".", "!"))] if rng.random() < greet else []
    intro = _intro(case, phrasing, rng)
    if intro:
        opening.append(intro)
    slots: dict[str, list[str]] = {"history": [], "duration": [], "severity": []}
    for modifier_id in case.stated:
        modifier = knowledge.modifier(modifier_id)
        slots[modifier.slot or "history"].append(say(rng.choice(modifier.say)))
    distractors = knowledge.general[(p.id, case.band, "distractors")]
    closings = phrasing["closings"]["first" if case.voice == "first" else "third"]
    return _Parts(
        opening=opening,
        complaint=say(rng.choice(p.say)),
        findings=[say(rng.choice(p.flag(flag_id).say)) for flag_id in case.present],
        slots=slots,
        denials=[say(rng.choice(p.flag(flag_id).deny)) for flag_id in case.denied]
        + [say(text) for text in case.extra_denials],
        distractor=say(rng.choice(distractors)) if distractors and rng.random() < chatty else None,
        closing=say(rng.choice(closings)) if rng.random() < close else None,
    )


def _join_opening(opening: list[str], first_line: str) -> str:
    """Greeting, intro and first sentence; a greeting ending in a comma runs on."""
    text = ""
    for piece in [*opening, first_line]:
        if text.endswith(","):
            text += " " + _lower_first(_sentence(piece))
        else:
            text += (" " if text else "") + (piece if piece.endswith(",") else _sentence(piece))
    return text


def _as_note(parts: _Parts, phrasing: dict[str, Any], rng: random.Random, typo_rate: float) -> str:
    middle = parts.findings + [s for slot in parts.slots.values() for s in slot] + parts.denials
    middle += [parts.distractor] if parts.distractor else []
    if rng.random() < 0.5:
        rng.shuffle(middle)
    body = [_sentence(f"{rng.choice(phrasing['connectors'])} {_lower_first(s)}" if i and rng.random() < 0.2 else s)
            for i, s in enumerate(middle)]
    style = rng.choices(("plain", "texting", "run-on"), weights=(0.7, 0.15, 0.15))[0]
    if style == "run-on" and body:
        joined = body[0].rstrip(".")
        for sentence in body[1:]:
            joined += rng.choice((", ", " and ")) + _lower_first(sentence.rstrip("."))
        body = [_sentence(joined)]
    text = _join_opening(parts.opening, _add_typos(parts.complaint, rng, typo_rate))
    text = " ".join([text, *(_add_typos(s, rng, typo_rate) for s in body)])
    if parts.closing:
        text += " " + _sentence(parts.closing)
    return text.lower().rstrip(".") if style == "texting" else text


def _as_dialogue(parts: _Parts, case: Case, phrasing: dict[str, Any], rng: random.Random, typo_rate: float) -> str:
    speaker = "Patient" if case.voice == "first" else "Caller"
    ask: Callable[[str], str] = lambda slot: fill(rng.choice(phrasing["nurse"][slot]), case.voice, case.sex)
    first_line = parts.complaint
    findings = list(parts.findings)
    if findings and rng.random() < 0.3:
        # People often blurt out the worrying detail before being asked.
        first_line = f"{first_line}, and {_lower_first(findings.pop(0))}"
    turns = [("symptoms", findings + parts.denials)] + [(slot, lines) for slot, lines in parts.slots.items()]
    turns = [(slot, lines) for slot, lines in turns if lines]
    lines = [f"{speaker}: {_join_opening(parts.opening, _add_typos(first_line, rng, typo_rate))}"]
    if not turns:
        turns = [("anything_else", [parts.distractor or rng.choice(phrasing["answers"]["nothing_else"])])]
    for slot, answers in turns:
        lines.append(f"Nurse: {_sentence(ask(slot))}")
        lines.append(f"{speaker}: " + " ".join(_sentence(_add_typos(a, rng, typo_rate)) for a in answers))
    if parts.closing and rng.random() < 0.5:
        lines.append(f"Nurse: {_sentence(ask('anything_else'))}")
        lines.append(f"{speaker}: {_sentence(parts.closing)}")
    return "\n".join(lines)


def render_message(case: Case, knowledge: Knowledge, rng: random.Random, dialogue: bool = False) -> str:
    """Write a case as a lay message, or as a short patient-nurse dialogue."""
    parts = _parts(case, knowledge, rng)
    typo_rate = 0.05 if rng.random() < 0.3 else 0.0
    if dialogue:
        return _as_dialogue(parts, case, knowledge.phrasing, rng, typo_rate)
    return _as_note(parts, knowledge.phrasing, rng, typo_rate)


def label_counts(n_examples: int, label_mix: dict[str, float]) -> dict[str, int]:
    """Exact per-label counts for ``n_examples`` (largest remainder, so they sum to n)."""
    unknown = set(label_mix) - set(LABELS)
    if unknown:
        raise ValueError(f"label_mix has unknown labels {sorted(unknown)}; expected {LABELS}")
    if n_examples < 0 or any(w < 0 for w in label_mix.values()) or sum(label_mix.values()) <= 0:
        raise ValueError("n_examples and label_mix weights must be non-negative, with a positive total")
    total = sum(label_mix.values())
    exact = {label: n_examples * label_mix.get(label, 0.0) / total for label in LABELS}
    counts = {label: int(value) for label, value in exact.items()}
    by_remainder = sorted(LABELS, key=lambda label: (-(exact[label] - counts[label]), LABELS.index(label)))
    for label in by_remainder[: n_examples - sum(counts.values())]:
        counts[label] += 1
    return counts


def _plan(knowledge: Knowledge, counts: dict[str, int], rng: random.Random) -> list[tuple[str, Presentation]]:
    """Which presentation to use for each example.

    Each label cycles through every presentation able to reach it before any
    repeats, so a few thousand examples cover the whole knowledge base.
    """
    plan: list[tuple[str, Presentation]] = []
    for label, count in counts.items():
        capable = [p for p in knowledge.presentations if _routes(p, label, knowledge)]
        if count and not capable:
            raise ValueError(f"no presentation in the knowledge base can produce label {label}")
        queue: list[Presentation] = []
        while len(queue) < count:
            batch = list(capable)
            rng.shuffle(batch)
            queue.extend(batch)
        plan.extend((label, p) for p in queue[:count])
    rng.shuffle(plan)
    return plan


def _realise(label: str, p: Presentation, knowledge: Knowledge, rng: random.Random, dialogue_share: float,
             seen: set[str]) -> tuple[Case, Decision, str]:
    """A case of ``p`` with the wanted label whose message text is new."""
    routes = _routes(p, label, knowledge)
    for _ in range(_MAX_TRIES):
        case = _sample_case(p, label, rng.choice(routes), knowledge, rng)
        if case is None:
            continue
        message = render_message(case, knowledge, rng, dialogue=rng.random() < dialogue_share)
        key = normalise_text(message)
        if key not in seen:
            seen.add(key)
            return case, decide(case, knowledge), message
    raise ValueError(f"presentation {p.id!r} could not produce a new {label} example; "
                     "check its rules or ask for fewer examples")


def generate(n_examples: int, label_mix: dict[str, float], seed: int, dialogue_share: float = 0.3,
             knowledge: Knowledge | None = None) -> list[Example]:
    """Build ``n_examples`` synthetic triage examples, deterministically for ``seed``.

    Labels follow ``label_mix`` exactly up to rounding; ``dialogue_share`` of
    the messages are patient-nurse dialogues. ``Example.group`` is the
    presentation id so that splitting by group keeps a complaint in one split.
    """
    if not 0.0 <= dialogue_share <= 1.0:
        raise ValueError("dialogue_share must be between 0 and 1")
    knowledge = knowledge or load_knowledge()
    rng = random.Random(seed)
    seen: set[str] = set()
    examples = []
    for index, (label, p) in enumerate(_plan(knowledge, label_counts(n_examples, label_mix), rng)):
        case, decision, message = _realise(label, p, knowledge, rng, dialogue_share, seen)
        examples.append(Example(
            id=f"b{index:06d}",
            prompt=render_prompt(message),
            completion=f"{decision.label} - {decision.reason}",
            label=decision.label,
            group=p.id,
            attrs={
                "age_band": case.band,
                "sex": case.sex,
                "system": p.system,
                "presentation": p.id,
                "rule": decision.rule,
                "negation": "yes" if case.denied or case.extra_denials else "no",
            },
        ))
    return examples
