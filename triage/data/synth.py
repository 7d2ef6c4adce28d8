"""The built-in synthetic triage set.

Three steps, each deterministic given its inputs (randomness comes from a passed-in generator):

1. ``load_knowledge`` (:mod:`triage.data.catalogue`) reads the YAML knowledge
   base in ``triage/data/knowledge/``: presentations with their red-flag
   discriminators and context lines, per-system screening negations, host
   modifiers (age, pregnancy, immunosuppression, ...) and general phrasing.
2. ``decide`` labels a ``Case`` (a presentation plus the facts stated about
   the patient) with explicit rules: the most urgent of the base label, every
   stated flag and every applicable modifier. Negations and context count for nothing.
3. ``render_message`` writes the case in its register (the patient, a parent,
   a relative, a terse text, a worried ramble or a clinician's summary) as a
   note or a short patient-nurse dialogue, in the number of sentences the case
   asks for, with varied wording, distractors and typos.

``generate`` ties them together for a requested size and label mix. Nothing
in a message's form may give its label away: every label takes the age bands
in the same shares (so who writes does not hint at it), register and length
are drawn before the label's facts, and label-neutral facts fill every
message to the length drawn. The data are synthetic and not for clinical use
(see ``triage/data/knowledge/README.md``).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from triage.data.catalogue import SEXES, TOKEN, Knowledge, Modifier, Presentation, age_choices, load_knowledge
from triage.data.splits import normalise_text
from triage.schema import LABELS, Example, render_prompt

DEFAULT_LABEL_MIX: dict[str, float] = {"ED": 0.30, "GP": 0.45, "HOME": 0.25}
"""Roughly the shape of telephone-triage outcomes: GP-level advice most often."""

REGISTERS: tuple[str, ...] = ("patient", "parent", "relative", "text", "worried", "clinician")
"""Who writes and how: the patient, a parent or carer (children), a partner, friend or relative
(adults), a terse text message, a long worried message, or a clinician's third-person summary."""

# How often patients write about themselves rather than a parent, partner or carer writing for them.
_FIRST_PERSON_SHARE = {"child": 0.3, "adult": 0.85, "pregnant": 0.9, "elderly": 0.55}
# Register shares per voice; "plain" is the patient, or a parent or relative, writing ordinarily.
_REGISTER_SHARE = {
    "first": {"plain": 0.6, "text": 0.2, "worried": 0.2},
    "third": {"plain": 0.55, "clinician": 0.15, "text": 0.15, "worried": 0.15},
}
_MAX_TRIES = 40
# Characters in a typical clause of the knowledge base (ten words): the unit of a message's length budget.
_CLAUSE_CHARS = 55


@dataclass(frozen=True)
class _Style:
    """How a register writes: weights for 1-6 sentences, and how often it greets, closes and digresses."""

    sentences: tuple[int, ...]
    greeting: float
    closing: float
    distractor: float


_PLAIN = _Style((12, 22, 26, 20, 12, 8), greeting=0.4, closing=0.55, distractor=0.3)
_STYLES: dict[str, _Style] = {
    "patient": _PLAIN,
    "parent": _PLAIN,
    "relative": _PLAIN,
    "text": _Style((50, 35, 15, 0, 0, 0), greeting=0.15, closing=0.3, distractor=0.1),
    "worried": _Style((0, 0, 0, 30, 40, 30), greeting=0.6, closing=0.85, distractor=0.5),
    "clinician": _Style((30, 45, 25, 0, 0, 0), greeting=0.2, closing=0.6, distractor=0.0),
}

# The nurse question a context line answers; a line matching none is another symptom.
# Checked in order: "paracetamol helps" is about severity before it is about medicines.
_CONTEXT_SLOTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("severity", re.compile(r"painkiller|paracetamol|ibuprofen|calpol|out of (ten|10)\b")),
    (
        "history",
        re.compile(
            r"\b(tablets?|medicines?|medication|inhalers?|prescribed|diagnosed|history|operation|"
            r"take|takes|taking|on the pill|allergic)\b"
        ),
    ),
    (
        "duration",
        re.compile(
            r"\b(since|ago|started|began|came on|yesterday|last (night|week|month)|"
            r"this (morning|afternoon|evening|week)|for (the )?(past|last)|hours?|days?|weeks?|"
            r"months?)\b"
        ),
    ),
)
# The order a nurse asks in; "other" (distractors, worries) answers "anything else?".
_SLOT_ORDER: tuple[str, ...] = ("symptoms", "duration", "history", "severity", "other")

_PRONOUNS: dict[str, dict[str, str]] = {
    "first": {
        "I": "I",
        "me": "me",
        "my": "my",
        "myself": "myself",
        "I'm": "I'm",
        "I've": "I've",
        "I'd": "I'd",
        "you": "you",
        "your": "your",
        "you're": "you're",
    },
    "female": {
        "I": "she",
        "me": "her",
        "my": "her",
        "myself": "herself",
        "I'm": "she's",
        "I've": "she's",
        "I'd": "she'd",
        "you": "she",
        "your": "her",
        "you're": "she's",
    },
    "male": {
        "I": "he",
        "me": "him",
        "my": "his",
        "myself": "himself",
        "I'm": "he's",
        "I've": "he's",
        "I'd": "he'd",
        "you": "he",
        "your": "his",
        "you're": "he's",
    },
}

# Typos never touch negations: a misspelt "not" could flip a message's meaning.
_PROTECTED_WORDS = frozenset({"no", "not", "never", "nothing", "none", "nor", "without"})
_MISSPELLINGS = {
    "definitely": "definately",
    "really": "realy",
    "because": "becuase",
    "stomach": "stomache",
    "temperature": "temprature",
    "breathe": "breath",
    "diarrhoea": "diarhoea",
    "tonight": "tonite",
    "painful": "painfull",
    "swollen": "swolen",
    "feeling": "feelin",
    "headache": "headach",
    "tired": "tierd",
    "probably": "prob",
    "tomorrow": "tomorow",
    "which": "wich",
    "breathing": "breathin",
    "vomiting": "vomitting",
    "bleeding": "bleding",
}
_TEXTING = {
    "you": "u",
    "please": "pls",
    "because": "cos",
    "tonight": "tonite",
    "tomorrow": "tmrw",
    "about": "abt",
    "really": "rly",
    "thanks": "thx",
}


@dataclass(frozen=True)
class Case:
    """One message's facts: the complaint, what it states about the patient, and who writes how much.

    ``present`` are flags the message states, ``denied`` flags it explicitly
    negates, ``stated`` host modifiers it mentions, ``screened`` screening
    negations of the presentation's system, ``context`` the presentation's
    context lines and ``distractors`` harmless details it adds (the last three
    as templates). Only the patient, ``present`` and ``stated`` reach
    ``decide``; ``register`` and ``sentences`` (the length aimed for) shape
    the wording.
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
    screened: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    distractors: tuple[str, ...] = ()
    register: str = "patient"
    sentences: int = 3


@dataclass(frozen=True)
class Decision:
    """A case's label, the id of the rule that set it and a one-line reason."""

    label: str
    rule: str
    reason: str


@dataclass(frozen=True)
class Message:
    """A rendered message and the number of sentences on the writer's side."""

    text: str
    sentences: int


@dataclass(frozen=True)
class Generated:
    """One generated example before it becomes an ``Example``: its facts, label and message."""

    case: Case
    decision: Decision
    message: Message


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

    Denied flags, screening negations and context are deliberately ignored. On equal
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
            options.append(
                (_urgency(modifier.label), 2 if modifier.stated else 3, modifier.id, _expand(modifier.reason, p))
            )
    urgency, _, rule, reason = min(options, key=lambda option: option[:2])
    return Decision(LABELS[urgency], rule, reason)


def _routes(p: Presentation, label: str, band: str, knowledge: Knowledge) -> list[tuple[str, str]]:
    """Ways a presentation can reach a label in an age band: its base, a flag, or a modifier."""
    routes = [("base", "")] if p.base == label else []
    if _urgency(label) < _urgency(p.base):
        routes += [("flag", f.id) for f in p.flags if f.label == label]
        routes += [
            ("modifier", m.id)
            for m in knowledge.modifiers
            if m.label == label
            and m.tags_any & p.tags
            and (not m.bands or band in m.bands)
            and (m.stated or age_choices(p, band, m.min_weeks or 0, m.max_weeks))
        ]
    return routes


def least_urgent(p: Presentation, band: str, knowledge: Knowledge) -> str:
    """The least urgent label a patient of ``band`` with ``p`` can have: inherent modifiers (a fever
    under 3 months) can rule out HOME."""
    ages = age_choices(p, band)
    # Only infants' modifiers depend on the age in weeks (modifiers.yaml); one age stands for any other band.
    sample = ages if band == "infant" else ages[:1]
    bare = (Case(p, band, age, p.sex or SEXES[0], "first", p.gestation[0]) for age in sample)
    return LABELS[max(_urgency(decide(case, knowledge).label) for case in bare)]


def reachable(p: Presentation, label: str, band: str, knowledge: Knowledge) -> bool:
    """Whether the generator can write a case of ``p`` in ``band`` with ``label``."""
    return _urgency(label) <= _urgency(least_urgent(p, band, knowledge)) and bool(_routes(p, label, band, knowledge))


def _sample_case(
    p: Presentation, label: str, band: str, route: tuple[str, str], knowledge: Knowledge, rng: random.Random
) -> Case | None:
    """Draw patient facts that realise ``route`` in ``band``; None when the route proves infeasible."""
    kind, ref = route
    modifier = knowledge.modifier(ref) if kind == "modifier" else None
    bounds = (modifier.min_weeks or 0, modifier.max_weeks) if modifier and not modifier.stated else (0, None)
    ages = age_choices(p, band, *bounds)
    if not ages:
        return None
    for _ in range(_MAX_TRIES):
        age_weeks = rng.choice(ages)
        voice = _pick_voice(p, band, age_weeks, rng)
        register = _pick_register(voice, band, rng)
        sentences = rng.choices(range(1, 7), weights=_STYLES[register].sentences)[0]
        present = _pick_flags(p, label, ref if kind == "flag" else None, rng)
        stated = _pick_stated(p, band, label, modifier if modifier and modifier.stated else None, knowledge, rng)
        # Label-neutral facts fill the message up to a length drawn before the label's own facts,
        # so that an ED flag makes a message no longer than a HOME one. The complaint itself is
        # about one and a half clauses long.
        budget = (sentences + 1.5 + rng.random()) * _CLAUSE_CHARS
        neutral = _pick_neutral(p, band, register, present, stated, budget, knowledge, rng)
        case = Case(
            presentation=p,
            band=band,
            age_weeks=age_weeks,
            sex="female" if band == "pregnant" else p.sex or rng.choice(SEXES),
            voice=voice,
            gestation=rng.randint(*p.gestation) if band == "pregnant" else None,
            present=present,
            stated=stated,
            register=register,
            sentences=sentences,
            **neutral,
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


def _pick_register(voice: str, band: str, rng: random.Random) -> str:
    """Who writes and how, given whether the patient writes."""
    shares = _REGISTER_SHARE[voice]
    register = rng.choices(list(shares), weights=list(shares.values()))[0]
    if register != "plain":
        return register
    if voice == "first":
        return "patient"
    return "parent" if band in ("infant", "child") else "relative"


def _pick_flags(p: Presentation, label: str, required: str | None, rng: random.Random) -> tuple[str, ...]:
    """The required flag plus, sometimes, up to two others that do not raise the label."""
    extras = [f.id for f in p.flags if f.id != required and _urgency(f.label) >= _urgency(label) and rng.random() < 0.2]
    return tuple(([required] if required else []) + extras[:2])


def _pick_stated(
    p: Presentation, band: str, label: str, required: Modifier | None, knowledge: Knowledge, rng: random.Random
) -> tuple[str, ...]:
    """The required stated modifier plus, rarely, optional ones that do not raise the label."""
    extras = [
        m.id
        for m in knowledge.modifiers
        if m.stated
        and m.optional
        and m is not required
        and m.tags_any & p.tags
        and (not m.bands or band in m.bands)
        and _urgency(m.label) >= _urgency(label)
        and rng.random() < 0.12
    ]
    return tuple(([required.id] if required else []) + extras)


def context_slot(template: str) -> str:
    """The nurse question a context line answers: symptoms, duration, history or severity."""
    lowered = template.lower()
    return next((slot for slot, pattern in _CONTEXT_SLOTS if pattern.search(lowered)), "symptoms")


def _mean_length(templates: tuple[str, ...]) -> float:
    """Characters, not words: flags use longer words than context, so equal word counts would still
    leave ED messages longer."""
    return sum(len(t) for t in templates) / len(templates)


def _negations(
    p: Presentation, band: str, present: tuple[str, ...], knowledge: Knowledge, rng: random.Random
) -> list[tuple[str, str, float]]:
    """Up to two denied flags and two screening negations of the system, shuffled, with their lengths."""
    flags = [("denied", f.id, _mean_length(f.deny)) for f in p.flags if f.deny and f.id not in present]
    screening = knowledge.general[(p.id, band, "denials")]
    negations = rng.sample(flags, min(2, len(flags)))
    negations += [("screened", line, _mean_length((line,))) for line in rng.sample(screening, min(2, len(screening)))]
    rng.shuffle(negations)
    return negations


def _pick_neutral(
    p: Presentation,
    band: str,
    register: str,
    present: tuple[str, ...],
    stated: tuple[str, ...],
    budget: float,
    knowledge: Knowledge,
    rng: random.Random,
) -> dict[str, tuple[str, ...]]:
    """Facts that never change the label, by ``Case`` field: denied flags, screening negations, context
    lines and distractors.

    A label-independent number of negations (and maybe a distractor) comes
    first; context lines, then spare distractors, follow while the message's
    expected length stays within ``budget`` characters. Were negations fill
    like context, HOME messages, with no flag taking up room, would carry most
    of them and hint at their label.
    """
    # A stated modifier already answers its question ("over three weeks", "on warfarin"); a context
    # line answering the same one could contradict it.
    answered = {knowledge.modifier(m).slot or "history" for m in stated}
    context = [("context", c, _mean_length((c,))) for c in rng.sample(p.context, min(3, len(p.context)))]
    # A clinician sticks to the point.
    pool = knowledge.general[(p.id, band, "distractors")] if _STYLES[register].distractor else ()
    distractors = [("distractors", line, _mean_length((line,))) for line in rng.sample(pool, min(2, len(pool)))]
    n_negations, n_distractors = rng.choice((0, 0, 1, 1, 2)), int(rng.random() < _STYLES[register].distractor)
    chosen = _negations(p, band, present, knowledge, rng)[:n_negations] + distractors[:n_distractors]
    spare = distractors[n_distractors:]
    options = [option for option in context if context_slot(option[1]) not in answered] + spare
    complaint = _mean_length(p.say)
    # A case without flags must be able to reach the budget too, so it is capped at what all the
    # options give, counting the context lines a stated modifier stands in for.
    budget = min(budget, complaint + sum(size for *_, size in chosen + context + spare))
    length = complaint + sum(size for *_, size in chosen)
    length += sum(_mean_length(p.flag(f).say) for f in present)
    length += sum(_mean_length(knowledge.modifier(m).say) for m in stated)
    for option in options:
        if length + option[2] / 2 > budget:
            break
        chosen.append(option)
        length += option[2]
    return {
        field: tuple(value for kind, value, _ in chosen if kind == field)
        for field in ("denied", "screened", "context", "distractors")
    }


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
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        if operation == "drop":
            return word[:i] + word[i + 1 :]
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
    values = {
        "age": age,
        "age_text": age_text,
        "gest": str(case.gestation),
        "rel": rng.choice(phrasing["relations"][case.band][case.sex]),
        "noun": rng.choice(phrasing["nouns"].get(case.band, {}).get(case.sex, ["person"])),
        "sexword": rng.choice(phrasing["sexwords"][case.sex]),
    }
    if case.register == "clinician":
        values["role"] = rng.choice(phrasing["clinician"]["roles"][case.band])
        templates = phrasing["clinician"]["intros_pregnant" if pregnant else "intros"]
    else:
        templates = phrasing["intros"][case.voice + ("_pregnant" if pregnant else "")]
    return fill(rng.choice(templates), case.voice, case.sex, values)


_Piece = tuple[str, str]
"""One clause of a message: (slot, text). The slot is the nurse question it answers
(symptoms, duration, history, severity), "other", or intro, complaint or closing."""


def _pieces(case: Case, knowledge: Knowledge, rng: random.Random) -> list[_Piece]:
    """Every clause of the message in writing order: intro, complaint, the rest, closing."""
    p, phrasing, style = case.presentation, knowledge.phrasing, _STYLES[case.register]
    say: Callable[[str], str] = functools.partial(
        fill, voice=case.voice, sex=case.sex, extra={"persists": p.persists or ""}
    )
    middle = [("symptoms", say(rng.choice(p.flag(flag_id).say))) for flag_id in case.present]
    for modifier in map(knowledge.modifier, case.stated):
        middle.append((modifier.slot or "history", say(rng.choice(modifier.say))))
    middle += [(context_slot(line), say(line)) for line in case.context]
    middle += [("symptoms", say(rng.choice(p.flag(flag_id).deny))) for flag_id in case.denied]
    middle += [("symptoms", say(line)) for line in case.screened]
    middle += [("other", say(line)) for line in case.distractors]
    if case.register == "worried":
        worries = phrasing["worries"][case.voice]
        middle += [("other", say(line)) for line in rng.sample(worries, min(len(worries), rng.randint(1, 2)))]
    if rng.random() < 0.5:
        rng.shuffle(middle)
    intro = _intro(case, phrasing, rng)
    closings = phrasing["clinician"]["closings"] if case.register == "clinician" else phrasing["closings"][case.voice]
    closing = [("closing", say(rng.choice(closings)))] if rng.random() < style.closing else []
    pieces = ([("intro", intro)] if intro else []) + [("complaint", say(rng.choice(p.say)))] + middle + closing
    return [(slot, text.strip().rstrip(".")) for slot, text in pieces]


def _group(pieces: list[_Piece], n: int, rng: random.Random) -> list[list[_Piece]]:
    """``pieces`` cut into ``n`` runs of neighbours, one sentence each (one per piece when fewer)."""
    n = min(n, len(pieces))
    cuts = sorted(rng.sample(range(1, len(pieces)), n - 1))
    return [pieces[start:end] for start, end in zip([0, *cuts], [*cuts, len(pieces)])]


def _compose(group: list[_Piece], register: str, rng: random.Random) -> str:
    """One sentence from neighbouring clauses, joined the way the register writes."""
    text = group[0][1]
    for (previous, _), (slot, piece) in zip(group, group[1:]):
        if register == "clinician":
            joiner = ": " if previous == "intro" else "; "
        elif slot == "closing":
            joiner = rng.choice((", ", " - ", " so "))
        else:
            joiner = rng.choice((", ", " and ", ", and ", " - "))
        text += joiner + _lower_first(piece)
    return _sentence(text)


def _greet(greeting: str | None, text: str, rng: random.Random) -> str:
    """A greeting before the first sentence; it is not counted as a sentence."""
    if not greeting:
        return text
    mark = rng.choice((",", ".", "!"))
    return f"{greeting}{mark} {_lower_first(text) if mark == ',' else text}"


def _as_text_message(text: str) -> str:
    """A terse text: lower case, common abbreviations, no punctuation (a decimal point stays: 38.5 is a fever)."""
    text = re.sub(r"[a-z]+", lambda match: _TEXTING.get(match.group(0), match.group(0)), text.lower())
    text = re.sub(r"\s+-\s+", " ", re.sub(r"\.(?!\d)|[,!?;:'\"()]", "", text))
    return re.sub(r"\s+", " ", text).strip()


def _write(group_texts: list[str], greeting: str | None, register: str, rng: random.Random) -> str:
    """The writer's sentences, greeted, as the register writes them."""
    text = _greet(greeting, " ".join(group_texts), rng)
    return _as_text_message(text) if register == "text" else text


def _as_note(
    case: Case, pieces: list[_Piece], greeting: str | None, phrasing: dict[str, Any], rng: random.Random
) -> Message:
    """The clauses in ``case.sentences`` sentences, some opened with a connector ("Also ...")."""
    sentences = []
    for index, group in enumerate(_group(pieces, case.sentences, rng)):
        sentence = _compose(group, case.register, rng)
        if index and case.register != "clinician" and group[0][0] in _SLOT_ORDER and rng.random() < 0.2:
            sentence = _sentence(f"{rng.choice(phrasing['connectors'])} {_lower_first(sentence)}")
        sentences.append(sentence)
    return Message(_write(sentences, greeting, case.register, rng), len(sentences))


def _turn_sentences(sizes: list[int], target: int, rng: random.Random) -> list[int]:
    """Sentences per answer: one each, then more where an answer has clauses to spare, up to ``target``."""
    counts = [1] * len(sizes)
    spare = [index for index, size in enumerate(sizes) for _ in range(size - 1)]
    for index in rng.sample(spare, max(0, min(len(spare), target - len(sizes)))):
        counts[index] += 1
    return counts


def _as_dialogue(
    case: Case, pieces: list[_Piece], greeting: str | None, phrasing: dict[str, Any], rng: random.Random
) -> Message:
    """A nurse's questions draw the clauses out by slot; the writer's side has ``case.sentences`` sentences."""
    speaker = "Patient" if case.voice == "first" else "Caller"

    def ask(slot: str) -> str:
        return _sentence(fill(rng.choice(phrasing["nurse"][slot]), case.voice, case.sex))

    opening = [piece for piece in pieces if piece[0] in ("intro", "complaint")]
    answers = {slot: [piece for piece in pieces if piece[0] == slot] for slot in _SLOT_ORDER}
    if answers["symptoms"] and rng.random() < 0.3:
        # People often blurt out a detail before being asked.
        opening.append(answers["symptoms"].pop(0))
    turns = [("", opening)] + [(slot, answers[slot]) for slot in _SLOT_ORDER if answers[slot]]
    if len(turns) == 1:
        turns.append(("other", [("other", rng.choice(phrasing["answers"]["nothing_else"]).rstrip("."))]))
    turns[-1] = (turns[-1][0], turns[-1][1] + [piece for piece in pieces if piece[0] == "closing"])
    counts = _turn_sentences([len(turn) for _, turn in turns], case.sentences, rng)
    lines = []
    for (slot, turn), count in zip(turns, counts):
        if slot:
            lines.append(f"Nurse: {ask('anything_else' if slot == 'other' else slot)}")
        sentences = [_compose(group, case.register, rng) for group in _group(turn, count, rng)]
        lines.append(f"{speaker}: {_write(sentences, None if slot else greeting, case.register, rng)}")
    return Message("\n".join(lines), sum(counts))


def render_message(case: Case, knowledge: Knowledge, rng: random.Random, dialogue: bool = False) -> Message:
    """Write a case in its register as a lay message, or as a short patient-nurse dialogue."""
    greeting = rng.choice(knowledge.phrasing["greetings"]) if rng.random() < _STYLES[case.register].greeting else None
    typo_rate = 0.05 if rng.random() < (0.5 if case.register == "text" else 0.3) else 0.0
    # Intros and closings stay clean: the age in an intro decides infant labels.
    pieces = [
        (slot, text if slot in ("intro", "closing") else _add_typos(text, rng, typo_rate))
        for slot, text in _pieces(case, knowledge, rng)
    ]
    write = _as_dialogue if dialogue else _as_note
    return write(case, pieces, greeting, knowledge.phrasing, rng)


def label_counts(n_examples: int, label_mix: dict[str, float]) -> dict[str, int]:
    """Exact per-label counts for ``n_examples`` (largest remainder, so they sum to n)."""
    unknown = set(label_mix) - set(LABELS)
    if unknown:
        raise ValueError(f"label_mix has unknown labels {sorted(unknown)}; expected {LABELS}")
    if n_examples < 0 or any(w < 0 for w in label_mix.values()) or sum(label_mix.values()) <= 0:
        raise ValueError("n_examples and label_mix weights must be non-negative, with a positive total")
    return _apportion(n_examples, {label: label_mix.get(label, 0.0) for label in LABELS})


def _apportion(total: int, weights: dict[str, float]) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` by largest remainder, so the parts sum to it exactly."""
    scale = sum(weights.values())
    exact = {key: total * weight / scale for key, weight in weights.items()}
    counts = {key: int(value) for key, value in exact.items()}
    order = list(weights)
    by_remainder = sorted(order, key=lambda key: (-(exact[key] - counts[key]), order.index(key)))
    for key in by_remainder[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def _plan(knowledge: Knowledge, counts: dict[str, int], rng: random.Random) -> list[tuple[str, Presentation, str]]:
    """Which presentation and age band to use for each example.

    Every label takes each age band in the same share (the band's share of
    the knowledge base), so neither the age nor who writes (a parent writes
    for a child) hints at the label. Within a label and band the plan cycles
    through every presentation able to reach it before any repeats.
    """
    pairs = [(p, band) for p in knowledge.presentations for band in p.ages]
    plan: list[tuple[str, Presentation, str]] = []
    for label, count in counts.items():
        capable: dict[str, list[Presentation]] = {}
        for p, band in pairs:
            if reachable(p, label, band, knowledge):
                capable.setdefault(band, []).append(p)
        if count and not capable:
            raise ValueError(f"no presentation in the knowledge base can produce label {label}")
        shares = {band: sum(b == band for _, b in pairs) for band in capable}
        for band, n in _apportion(count, shares).items():
            queue: list[Presentation] = []
            while len(queue) < n:
                batch = list(capable[band])
                rng.shuffle(batch)
                queue.extend(batch)
            plan.extend((label, p, band) for p in queue[:n])
    rng.shuffle(plan)
    return plan


def _realise(
    label: str,
    p: Presentation,
    band: str,
    knowledge: Knowledge,
    rng: random.Random,
    dialogue_share: float,
    seen: set[str],
) -> Generated:
    """A case of ``p`` in ``band`` with the wanted label whose message text is new."""
    routes = _routes(p, label, band, knowledge)
    for _ in range(_MAX_TRIES):
        case = _sample_case(p, label, band, rng.choice(routes), knowledge, rng)
        if case is None:
            continue
        message = render_message(case, knowledge, rng, dialogue=rng.random() < dialogue_share)
        key = normalise_text(message.text)
        if key not in seen:
            seen.add(key)
            return Generated(case, decide(case, knowledge), message)
    raise ValueError(
        f"presentation {p.id!r} could not produce a new {label} example for the {band} band; "
        "check its rules or ask for fewer examples"
    )


def generate_cases(
    n_examples: int,
    label_mix: dict[str, float],
    seed: int,
    dialogue_share: float = 0.3,
    knowledge: Knowledge | None = None,
) -> list[Generated]:
    """The cases behind ``generate``, with their facts, decisions and messages."""
    if not 0.0 <= dialogue_share <= 1.0:
        raise ValueError("dialogue_share must be between 0 and 1")
    knowledge = knowledge or load_knowledge()
    rng = random.Random(seed)
    seen: set[str] = set()
    return [
        _realise(label, p, band, knowledge, rng, dialogue_share, seen)
        for label, p, band in _plan(knowledge, label_counts(n_examples, label_mix), rng)
    ]


def generate(
    n_examples: int,
    label_mix: dict[str, float],
    seed: int,
    dialogue_share: float = 0.3,
    knowledge: Knowledge | None = None,
) -> list[Example]:
    """Build ``n_examples`` synthetic triage examples, deterministically for ``seed``.

    Labels follow ``label_mix`` exactly up to rounding; ``dialogue_share`` of
    the messages are patient-nurse dialogues. ``Example.group`` is the
    presentation id so that splitting by group keeps a complaint in one split.
    """
    generated = generate_cases(n_examples, label_mix, seed, dialogue_share, knowledge)
    return [_example(index, item) for index, item in enumerate(generated)]


def _example(index: int, generated: Generated) -> Example:
    case, decision, message = generated.case, generated.decision, generated.message
    return Example(
        id=f"b{index:06d}",
        prompt=render_prompt(message.text),
        completion=f"{decision.label} - {decision.reason}",
        label=decision.label,
        group=case.presentation.id,
        attrs={
            "age_band": case.band,
            "sex": case.sex,
            "system": case.presentation.system,
            "presentation": case.presentation.id,
            "rule": decision.rule,
            "negation": "yes" if case.denied or case.screened else "no",
            "register": case.register,
            "sentences": str(message.sentences),
        },
    )
