"""The knowledge base behind the built-in cases: presentations, red-flag discriminators, host modifiers and phrasing,
read from the YAML files in ``knowledge/`` and validated on load (errors name the file, line and field)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from triage.data.splits import normalise_text
from triage.schema import LABELS, DataError

KNOWLEDGE_DIR = Path(__file__).parent / "knowledge"


AGE_BANDS: tuple[str, ...] = ("infant", "child", "adult", "pregnant", "elderly")


SEXES: tuple[str, ...] = ("female", "male")

BAND_YEARS = {"child": (1, 15), "adult": (18, 64), "pregnant": (18, 44), "elderly": (65, 96)}
# Infant ages in weeks: every week up to 12, then whole months 3-11 (13 weeks = 3 months).
INFANT_WEEKS: tuple[int, ...] = tuple(range(1, 13)) + tuple(m * 52 // 12 for m in range(3, 12))
_DEFAULT_GESTATION = (6, 40)

TOKEN = re.compile(r"\{([^{}]*)\}")
"""A placeholder in a phrasing template: a pronoun to fill, or ``{a|b}`` for the verb form."""
PATIENT_TOKENS = frozenset({"I", "me", "my", "myself", "I'm", "I've", "I'd"})
_NURSE_TOKENS = frozenset({"you", "your", "you're"})


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
    context: tuple[str, ...] = ()
    """Label-neutral detail (onset, associated symptoms, history, medicines, what others notice)."""

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
    """Per (presentation id, age band, group): "denials" are the screening negations of the presentation's
    system, "distractors" the shared harmless details; both without words that clash with its own wording."""

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


class _LineLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML loader (libyaml when available) that keeps each mapping's line as ``__line__``."""


def _mapping_with_line(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


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
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) for v in value)
            or value[0] > value[1]
            or value[0] < 0
        ):
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
            problem = template_problem(value, PATIENT_TOKENS | extra_tokens)
            if problem:
                self.fail(key, f"{problem} in {value!r}")
        return values


def template_problem(template: str, allowed: frozenset[str]) -> str | None:
    """Why a phrasing template is malformed, or None when it is fine."""
    for token in TOKEN.findall(template):
        if "|" not in token and token not in allowed:
            return f"unknown placeholder {{{token}}}"
    if "{" in TOKEN.sub("", template) or "}" in TOKEN.sub("", template):
        return "unbalanced braces"
    return None


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


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
        context=fields.templates("context", required=False),
    )
    for band in presentation.ages:
        if not age_choices(presentation, band):
            fields.fail("ages", f"band {band!r} has no age inside years/weeks")
    if "pregnant" in presentation.ages and presentation.sex == "male":
        fields.fail("sex", "a presentation in pregnancy cannot be male only")
    return presentation


def _parse_knowledge(directory: Path) -> Knowledge:
    mod_path, phr_path = directory / "modifiers.yaml", directory / "phrasing.yaml"
    mod_raw = _Fields(mod_path, _read_yaml(mod_path), "modifiers file")
    modifiers = tuple(
        [_parse_modifier(mod_path, row, stated=False) for row in mod_raw.raw.get("inherent") or []]
        + [_parse_modifier(mod_path, row, stated=True) for row in mod_raw.raw.get("stated") or []]
    )
    tags = frozenset().union(*(m.tags_any for m in modifiers))
    systems, screening = _read_systems(directory)
    parsed = [
        (presentation, row)
        for system in systems
        for presentation, row in _read_system_file(directory, system, systems, tags)
    ]
    if not parsed:
        raise DataError(directory / "presentations", None, None, "no presentations")
    presentations = tuple(presentation for presentation, _ in parsed)
    _check_unique([(p.id, row, "id") for p, row in parsed])
    # Context lines count as wording too: a line shared by two presentations would leak across splits.
    _check_unique(
        [(normalise_text(s), row, name) for p, row in parsed for name in ("say", "context") for s in getattr(p, name)]
    )
    _check_unique([(m.id, {"__path__": mod_path}, "id") for m in modifiers])
    systems_path = directory / "systems.yaml"
    _check_unique(
        [
            (normalise_text(row["say"]), {"__path__": systems_path, **row}, "say")
            for rows in screening.values()
            for row in rows
        ]
    )
    phrasing = _read_yaml(phr_path)
    _check_phrasing(phr_path, phrasing)
    return assemble(presentations, modifiers, {**phrasing, "screening": screening})


def assemble(
    presentations: tuple[Presentation, ...], modifiers: tuple[Modifier, ...], phrasing: dict[str, Any]
) -> Knowledge:
    """A knowledge base from its parts, with the pools derived from them (also after a wording hold-out).

    A presentation's denials are its own system's screening negations only, so a
    self-harm dialogue never answers "no chest pain".
    """
    general = {}
    for p in presentations:
        pools = {"denials": phrasing["screening"].get(p.system, []), "distractors": phrasing["distractors"]}
        for band in p.ages:
            for group, rows in pools.items():
                general[(p.id, band, group)] = _allowed_general(p, band, rows)
    return Knowledge(presentations=presentations, modifiers=modifiers, phrasing=phrasing, general=general)


def _read_systems(directory: Path) -> tuple[tuple[str, ...], dict[str, list[dict[str, Any]]]]:
    """The systems listed in systems.yaml, each with exactly one presentations/<system>.yaml, and their
    screening negations."""
    path = directory / "systems.yaml"
    raw = _Fields(path, _read_yaml(path), "systems file")
    systems = raw.texts("systems")
    files = {p.stem for p in (directory / "presentations").glob("*.yaml")}
    stray = sorted(files - set(systems))
    if stray:
        raise DataError(
            directory / "presentations" / f"{stray[0]}.yaml",
            None,
            None,
            f"no system {stray[0]!r} in {path}; add it there or rename the file",
        )
    return systems, _read_screening(path, raw, systems)


def _read_screening(path: Path, raw: _Fields, systems: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Each system's screening negations: rows of ``say`` with optional ``clash`` stems and ``bands``."""
    section = _Fields(path, raw.raw.get("screening"), "screening")
    unknown = sorted(set(section.raw) - set(systems) - {"__line__"})
    if unknown:
        section.fail(unknown[0], f"no system {unknown[0]!r} in systems")
    screening = {}
    for system in systems:
        rows = section.raw.get(system)
        if not isinstance(rows, list) or not rows:
            section.fail(system, "must be a non-empty list of screening negations")
        for row in rows:
            _check_pool_row(path, row, f"screening {system}")
        screening[system] = rows
    return screening


def _read_system_file(
    directory: Path, system: str, systems: Sequence[str], tags: frozenset[str]
) -> list[tuple[Presentation, dict[str, Any]]]:
    path = directory / "presentations" / f"{system}.yaml"
    rows = _Fields(path, _read_yaml(path), "presentations file").raw.get("presentations")
    if not isinstance(rows, list) or not rows:
        raise DataError(path, None, "presentations", "must be a non-empty list")
    parsed = []
    for row in rows:
        if isinstance(row, dict):
            row["__path__"] = path
        presentation = _parse_presentation(path, row, systems, tags)
        if presentation.system != system:
            raise DataError(
                path,
                row.get("__line__"),
                "system",
                f"presentation {presentation.id} is {presentation.system!r} but sits in {system}.yaml",
            )
        parsed.append((presentation, row))
    return parsed


def _allowed_general(p: Presentation, band: str, rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """General phrasing items fit for a presentation: right band, no word clashing with its own wording."""
    own_words = " ".join((p.name, *p.say, *p.context, *(s for f in p.flags for s in f.say + f.deny))).lower()
    return tuple(
        row["say"]
        for row in rows
        if band in row.get("bands", AGE_BANDS)
        and not any(str(stem).lower() in own_words for stem in row.get("clash", []))
    )


def _check_unique(keyed: list[tuple[str, dict[str, Any], str]]) -> None:
    """Different items must never share wording: the leakage check relies on it."""
    seen: dict[str, Any] = {}
    for key, row, field_name in keyed:
        if key in seen:
            raise DataError(row["__path__"], row.get("__line__"), field_name, f"duplicate {field_name} {key!r}")
        seen[key] = row


_VALUE_TOKENS = frozenset({"age", "age_text", "gest", "rel", "noun", "sexword"})


def _check_phrasing(path: Path, phrasing: Any) -> None:
    fields = _Fields(path, phrasing, "phrasing file")
    for key in ("greetings", "connectors"):
        fields.texts(key)
    nurse_tokens = _NURSE_TOKENS | PATIENT_TOKENS
    for group, allowed in (
        ("closings", nurse_tokens),
        ("nurse", nurse_tokens),
        ("answers", nurse_tokens),
        ("worries", PATIENT_TOKENS),
        ("intros", _VALUE_TOKENS),
    ):
        section = _Fields(path, phrasing.get(group), group)
        for key in (k for k in section.raw if k != "__line__"):
            section.templates(key, allowed)
    clinician = _Fields(path, phrasing.get("clinician"), "clinician")
    clinician.templates("intros", _VALUE_TOKENS | {"role"})
    clinician.templates("intros_pregnant", _VALUE_TOKENS | {"role"})
    clinician.templates("closings", nurse_tokens)
    roles = _Fields(path, clinician.raw.get("roles"), "clinician roles")
    for band in AGE_BANDS:
        roles.texts(band)
    for group in ("relations", "nouns", "sexwords"):
        _Fields(path, phrasing.get(group), group)
    for row in phrasing.get("distractors") or fields.fail("distractors", "must be a non-empty list"):
        _check_pool_row(path, row, "distractors")


def _check_pool_row(path: Path, row: Any, where: str) -> None:
    """A pooled line: a ``say`` template, optional ``bands`` and ``clash`` stems."""
    item = _Fields(path, row, where)
    problem = template_problem(item.text("say"), PATIENT_TOKENS)
    if problem:
        item.fail("say", problem)
    item.subset("bands", AGE_BANDS, required=False)
    item.texts("clash", required=False)


@functools.lru_cache(maxsize=4)
def _load_cached(directory: str) -> Knowledge:
    return _parse_knowledge(Path(directory))


def load_knowledge(directory: str | Path = KNOWLEDGE_DIR) -> Knowledge:
    """Parse and validate the knowledge base; errors name the file, line and field."""
    return _load_cached(str(Path(directory).resolve()))


def age_choices(p: Presentation, band: str, low_weeks: int = 0, high_weeks: int | None = None) -> list[int]:
    """Possible ages in weeks for a presentation in one band, optionally bounded."""
    if band == "infant":
        lo, hi = p.weeks or (0, 52)
        if p.years and p.years[0] > 0:
            return []
        weeks = [w for w in INFANT_WEEKS if lo <= w <= hi]
    else:
        lo, hi = BAND_YEARS[band]
        if p.years:
            lo, hi = max(lo, p.years[0]), min(hi, p.years[1])
        weeks = [years * 52 for years in range(lo, hi + 1)]
    return [w for w in weeks if w >= low_weeks and (high_weeks is None or w < high_weeks)]
