"""The built-in synthetic triage set.

Three steps, each deterministic given its inputs (randomness comes from a passed-in generator):

1. ``load_knowledge`` reads the YAML knowledge base in ``triage/data/knowledge/``:
   presentations with their red-flag discriminators, host modifiers (age,
   pregnancy, immunosuppression, ...) and general phrasing.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from triage.schema import LABELS, DataError, Example, render_prompt
from triage.data.splits import normalise_text

KNOWLEDGE_DIR = Path(__file__).parent / "knowledge"
DEFAULT_LABEL_MIX: dict[str, float] = {"ED": 0.30, "GP": 0.45, "HOME": 0.25}
"""Roughly the shape of telephone-triage outcomes: GP-level advice most often."""

AGE_BANDS: tuple[str, ...] = ("infant", "child", "adult", "pregnant", "elderly")
SEXES: tuple[str, ...] = ("female", "male")

_BAND_YEARS = {"child": (1, 15), "adult": (18, 64), "pregnant": (18, 44), "elderly": (65, 96)}
# Infant ages in weeks: every week up to 12, then whole months 3-11 (13 weeks = 3 months).
_INFANT_WEEKS: tuple[int, ...] = tuple(range(1, 13)) + tuple(m * 52 // 12 for m in range(3, 12))
_DEFAULT_GESTATION = (6, 40)
# How often patients write about themselves rather than a parent, partner or carer writing for them.
_FIRST_PERSON_SHARE = {"child": 0.3, "adult": 0.85, "pregnant": 0.9, "elderly": 0.55}
_MAX_TRIES = 40

_TOKEN = re.compile(r"\{([^{}]*)\}")
_PATIENT_TOKENS = frozenset({"I", "me", "my", "myself", "I'm", "I've", "I'd"})
_NURSE_TOKENS = frozenset({"you", "your", "you're"})
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


# --------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class Flag:
    """A red-flag discriminator of one presentation: stating it sets at least ``label``."""

    id: str
    label: str
    rule: str
    reason: str
    say: tuple[str, ...]
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class Presentation:
    """One base complaint, its base label and its discriminators."""

    id: str
    name: str
    system: str
    ages: tuple[str, ...]
    base: str
    reason: str
    say: tuple[str, ...]
    flags: tuple[Flag, ...] = ()
    tags: frozenset[str] = frozenset()
    sex: str | None = None
    persists: str | None = None
    years: tuple[int, int] | None = None
    weeks: tuple[int, int] | None = None
    gestation: tuple[int, int] = _DEFAULT_GESTATION
    voice: str | None = None

    def flag(self, flag_id: str) -> Flag:
        for candidate in self.flags:
            if candidate.id == flag_id:
                return candidate
        raise KeyError(f"presentation {self.id!r} has no flag {flag_id!r}")


@dataclass(frozen=True)
class Modifier:
    """A host modifier: applies to presentations with one of ``tags_any``."""

    id: str
    label: str
    rule: str
    reason: str
    tags_any: frozenset[str]
    stated: bool
    bands: tuple[str, ...] = ()
    min_weeks: int | None = None
    max_weeks: int | None = None
    optional: bool = False
    slot: str | None = None
    say: tuple[str, ...] = ()


@dataclass(frozen=True)
class Knowledge:
    """The parsed knowledge base."""

    presentations: tuple[Presentation, ...]
    modifiers: tuple[Modifier, ...]
    phrasing: dict[str, Any] = field(hash=False, compare=False)
    general: dict[tuple[str, str, str], tuple[str, ...]] = field(hash=False, compare=False, default_factory=dict)
    """Denials and distractors allowed per (presentation id, age band, "denials"/"distractors")."""

    def presentation(self, presentation_id: str) -> Presentation:
        for candidate in self.presentations:
            if candidate.id == presentation_id:
                return candidate
        raise KeyError(f"no presentation {presentation_id!r}")

    def modifier(self, modifier_id: str) -> Modifier:
        for candidate in self.modifiers:
            if candidate.id == modifier_id:
                return candidate
        raise KeyError(f"no modifier {modifier_id!r}")


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


# --------------------------------------------------------------------------- loading
class _LineLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML loader (libyaml when available) that keeps each mapping's line as ``__line__``."""


def _mapping_with_line(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


class _Fields:
    """Typed reads from one YAML mapping; every failure names file, line and field."""

    _MISSING = object()

    def __init__(self, path: Path, raw: Any, where: str):
        if not isinstance(raw, dict):
            raise DataError(path, None, None, f"{where}: expected a mapping")
        self.path, self.raw, self.where = path, raw, where
        self.line: int | None = raw.get("__line__")

    def fail(self, key: str, message: str) -> NoReturn:
        raise DataError(self.path, self.line, key, f"{self.where}: {message}")

    def text(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw.get(key, default)
        if value is self._MISSING:
            self.fail(key, "is required")
        if value is not default and (not isinstance(value, str) or not value.strip()):
            self.fail(key, "must be a non-empty string")
        return value

    def texts(self, key: str, required: bool = True) -> tuple[str, ...]:
        value = self.raw.get(key)
        if value is None and not required:
            return ()
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            self.fail(key, "must be a non-empty list of strings")
        return tuple(value)

    def label(self, key: str) -> str:
        value = self.text(key)
        if value not in LABELS:
            self.fail(key, f"{value!r} is not one of {', '.join(LABELS)}")
        return value

    def choice(self, key: str, allowed: Sequence[str], default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if value is not default and value not in allowed:
            self.fail(key, f"{value!r} is not one of {', '.join(allowed)}")
        return value

    def subset(self, key: str, allowed: Sequence[str], required: bool = True) -> tuple[str, ...]:
        values = self.texts(key, required)
        unknown = [v for v in values if v not in allowed]
        if unknown:
            self.fail(key, f"unknown value(s) {unknown}; expected some of {', '.join(allowed)}")
        return values

    def span(self, key: str) -> tuple[int, int] | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) for v in value)
                or value[0] > value[1] or value[0] < 0):
            self.fail(key, "must be [min, max] with 0 <= min <= max")
        return value[0], value[1]

    def integer(self, key: str) -> int | None:
        value = self.raw.get(key)
        if value is not None and (not isinstance(value, int) or value < 0):
            self.fail(key, "must be a non-negative integer")
        return value

    def templates(self, key: str, extra_tokens: frozenset[str] = frozenset(), required: bool = True) -> tuple[str, ...]:
        values = self.texts(key, required)
        for value in values:
            problem = template_problem(value, _PATIENT_TOKENS | extra_tokens)
            if problem:
                self.fail(key, f"{problem} in {value!r}")
        return values


def template_problem(template: str, allowed: frozenset[str]) -> str | None:
    """Why a phrasing template is malformed, or None when it is fine."""
    for token in _TOKEN.findall(template):
        if "|" not in token and token not in allowed:
            return f"unknown placeholder {{{token}}}"
    if "{" in _TOKEN.sub("", template) or "}" in _TOKEN.sub("", template):
        return "unbalanced braces"
    return None


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except FileNotFoundError:
        raise DataError(path, None, None, "knowledge file is missing") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise DataError(path, mark.line + 1 if mark else None, None, f"invalid YAML: {error}") from None


def _parse_modifier(path: Path, raw: Any, stated: bool) -> Modifier:
    fields = _Fields(path, raw, f"modifier {raw.get('id', '?') if isinstance(raw, dict) else '?'}")
    tokens = frozenset({"persists"})
    return Modifier(
        id=fields.text("id"),
        label=fields.label("label"),
        rule=fields.text("rule"),
        reason=fields.text("reason"),
        tags_any=frozenset(fields.texts("tags_any")),
        stated=stated,
        bands=fields.subset("bands", AGE_BANDS, required=False),
        min_weeks=fields.integer("min_weeks"),
        max_weeks=fields.integer("max_weeks"),
        optional=bool(raw.get("optional", False)),
        slot=fields.choice("slot", ("history", "duration", "severity"), None) if stated else None,
        say=fields.templates("say", tokens) if stated else (),
    )


def _parse_flag(path: Path, raw: Any, owner: str, base: str) -> Flag:
    fields = _Fields(path, raw, f"presentation {owner} flag {raw.get('id', '?') if isinstance(raw, dict) else '?'}")
    flag = Flag(
        id=fields.text("id"),
        label=fields.label("label"),
        rule=fields.text("rule"),
        reason=fields.text("reason"),
        say=fields.templates("say"),
        deny=fields.templates("deny", required=False),
    )
    if LABELS.index(flag.label) > LABELS.index(base):
        fields.fail("label", f"a flag cannot be less urgent than the base label {base}")
    return flag


def _parse_presentation(path: Path, raw: Any, systems: Sequence[str], tags: frozenset[str]) -> Presentation:
    fields = _Fields(path, raw, f"presentation {raw.get('id', '?') if isinstance(raw, dict) else '?'}")
    pid = fields.text("id")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", pid):
        fields.fail("id", "must be lower_snake_case")
    base = fields.label("base")
    flag_rows = raw.get("flags") or []
    if not isinstance(flag_rows, list):
        fields.fail("flags", "must be a list")
    flags = tuple(_parse_flag(path, row, pid, base) for row in flag_rows)
    if len({f.id for f in flags}) != len(flags):
        fields.fail("flags", "flag ids must be unique within a presentation")
    own_tags = frozenset(fields.texts("tags", required=False))
    if own_tags - tags:
        fields.fail("tags", f"unknown tag(s) {sorted(own_tags - tags)}; modifiers use {sorted(tags)}")
    persists = fields.text("persists", None)
    presentation = Presentation(
        id=pid,
        name=fields.text("name"),
        system=fields.choice("system", systems),
        ages=fields.subset("ages", AGE_BANDS),
        base=base,
        reason=fields.text("reason"),
        say=fields.templates("say"),
        flags=flags,
        tags=own_tags | ({"persists"} if persists else set()),
        sex=fields.choice("sex", SEXES, None),
        persists=persists,
        years=fields.span("years"),
        weeks=fields.span("weeks"),
        gestation=fields.span("gestation") or _DEFAULT_GESTATION,
        voice=fields.choice("voice", ("first", "third"), None),
    )
    for band in presentation.ages:
        if not _age_choices(presentation, band):
            fields.fail("ages", f"band {band!r} has no age inside years/weeks")
    if "pregnant" in presentation.ages and presentation.sex == "male":
        fields.fail("sex", "a presentation in pregnancy cannot be male only")
    return presentation


def _parse_knowledge(directory: Path) -> Knowledge:
    pres_path, mod_path, phr_path = (directory / name for name in
                                     ("presentations.yaml", "modifiers.yaml", "phrasing.yaml"))
    mod_raw = _Fields(mod_path, _read_yaml(mod_path), "modifiers file")
    modifiers = tuple(
        [_parse_modifier(mod_path, row, stated=False) for row in mod_raw.raw.get("inherent") or []]
        + [_parse_modifier(mod_path, row, stated=True) for row in mod_raw.raw.get("stated") or []]
    )
    tags = frozenset().union(*(m.tags_any for m in modifiers))
    pres_raw = _Fields(pres_path, _read_yaml(pres_path), "presentations file")
    systems = pres_raw.texts("systems")
    rows = pres_raw.raw.get("presentations")
    if not isinstance(rows, list) or not rows:
        pres_raw.fail("presentations", "must be a non-empty list")
    presentations = tuple(_parse_presentation(pres_path, row, systems, tags) for row in rows)
    _check_unique(pres_path, [(p.id, row) for p, row in zip(presentations, rows)], "id")
    _check_unique(pres_path, [(normalise_text(s), row) for p, row in zip(presentations, rows) for s in p.say], "say")
    _check_unique(mod_path, [(m.id, {}) for m in modifiers], "id")
    phrasing = _read_yaml(phr_path)
    _check_phrasing(phr_path, phrasing)
    general = {(p.id, band, group): _allowed_general(p, band, phrasing[group])
               for p in presentations for band in p.ages for group in ("denials", "distractors")}
    return Knowledge(presentations=presentations, modifiers=modifiers, phrasing=phrasing, general=general)


def _allowed_general(p: Presentation, band: str, rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """General phrasing items fit for a presentation: right band, no word clashing with its own wording."""
    own_words = " ".join((p.name, *p.say, *(s for f in p.flags for s in f.say + f.deny))).lower()
    return tuple(row["say"] for row in rows
                 if band in row.get("bands", AGE_BANDS)
                 and not any(str(stem).lower() in own_words for stem in row.get("clash", [])))


def _check_unique(path: Path, keyed: list[tuple[str, Any]], field_name: str) -> None:
    """Different presentations must never share wording: the leakage check relies on it."""
    seen: dict[str, Any] = {}
    for key, row in keyed:
        if key in seen:
            raise DataError(path, row.get("__line__"), field_name, f"duplicate {field_name} {key!r}")
        seen[key] = row


def _check_phrasing(path: Path, phrasing: Any) -> None:
    fields = _Fields(path, phrasing, "phrasing file")
    for key in ("greetings", "connectors"):
        fields.texts(key)
    nurse_tokens = _NURSE_TOKENS | _PATIENT_TOKENS
    for group, allowed in (("closings", nurse_tokens), ("nurse", nurse_tokens), ("answers", nurse_tokens),
                           ("intros", frozenset({"age", "age_text", "gest", "rel", "noun", "sexword"}))):
        section = _Fields(path, phrasing.get(group), group)
        for key in (k for k in section.raw if k != "__line__"):
            section.templates(key, allowed)
    for group in ("relations", "nouns", "sexwords"):
        _Fields(path, phrasing.get(group), group)
    for group in ("denials", "distractors"):
        for row in phrasing.get(group) or fields.fail(group, "must be a non-empty list"):
            item = _Fields(path, row, group)
            problem = template_problem(item.text("say"), _PATIENT_TOKENS)
            if problem:
                item.fail("say", problem)
            item.subset("bands", AGE_BANDS, required=False)


@functools.lru_cache(maxsize=4)
def _load_cached(directory: str) -> Knowledge:
    return _parse_knowledge(Path(directory))


def load_knowledge(directory: str | Path = KNOWLEDGE_DIR) -> Knowledge:
    """Parse and validate the knowledge base; errors name the file, line and field."""
    return _load_cached(str(Path(directory).resolve()))


# --------------------------------------------------------------------------- rules
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


# --------------------------------------------------------------------------- case sampling
def _age_choices(p: Presentation, band: str, low_weeks: int = 0, high_weeks: int | None = None) -> list[int]:
    """Possible ages in weeks for a presentation in one band, optionally bounded."""
    if band == "infant":
        lo, hi = p.weeks or (0, 52)
        if p.years and p.years[0] > 0:
            return []
        weeks = [w for w in _INFANT_WEEKS if lo <= w <= hi]
    else:
        lo, hi = _BAND_YEARS[band]
        if p.years:
            lo, hi = max(lo, p.years[0]), min(hi, p.years[1])
        weeks = [years * 52 for years in range(lo, hi + 1)]
    return [w for w in weeks if w >= low_weeks and (high_weeks is None or w < high_weeks)]


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
        ages = _age_choices(p, band, *bounds)
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


# --------------------------------------------------------------------------- rendering
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

    return _TOKEN.sub(substitute, template)


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


# --------------------------------------------------------------------------- generation
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
