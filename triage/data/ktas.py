"""The public KTAS emergency-triage data (Moon et al. 2019): its CSV read into examples.

Each visit is rendered as a triage nurse's note; the nurse's own level and the vital-sign status go to attrs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from triage.data.importers import Source, csv_records, require_columns
from triage.schema import Example, render_prompt

T = TypeVar("T")

KTAS_TEXT_COLUMNS: tuple[str, ...] = (
    "Sex",
    "Age",
    "Arrival mode",
    "Injury",
    "Chief_complain",
    "Mental",
    "Pain",
    "NRS_pain",
    "SBP",
    "DBP",
    "HR",
    "RR",
    "BT",
    "Saturation",
)
"""The only columns the rendered note is built from: what a triage nurse knows at the door."""

KTAS_OUTCOME_COLUMNS: tuple[str, ...] = (
    "KTAS_RN",
    "Diagnosis in ED",
    "Disposition",
    "Error_group",
    "Length of stay_min",
    "KTAS duration_min",
    "mistriage",
)
"""Known only after triage (or derived from the label); never shown to the model."""

_KTAS_LABELS = {1: "ED", 2: "ED", 3: "ED", 4: "GP", 5: "HOME"}
NURSE_COLUMN = "KTAS_RN"
"""The triage nurse's KTAS level: read into ``attrs["nurse_label"]`` (mapped like the label), never into the text."""
# Codebook of the public release (Moon et al. 2019, PLOS ONE; the Kaggle description).
_KTAS_SEX = {1: "female", 2: "male"}
_KTAS_ARRIVAL = {
    1: "walked in",
    2: "arrived by public ambulance",
    3: "arrived by private vehicle",
    4: "arrived by private ambulance",
    5: "arrived by other transport",
    6: "arrived by other transport",
    7: "arrived by other transport",
}
_KTAS_MENTAL = {1: "Alert.", 2: "Responds to voice only.", 3: "Responds to pain only.", 4: "Unresponsive."}
_KTAS_INJURY = {1: False, 2: True}
_KTAS_PAIN = {0: False, 1: True}
# Turkish Excel's "#NULL!" ("#BOŞ!" in cp1254, "#BOÞ!" when misread as Latin-1).
_KTAS_EMPTY = frozenset({"", "#BOŞ!", "#BOÞ!"})


@dataclass(frozen=True)
class KtasVisit:
    """The door-side facts of one KTAS visit; None = not recorded."""

    age: int | None
    sex: str | None
    arrival: str | None
    injury: bool | None
    complaint: str | None
    mental: str | None
    pain: bool | None
    nrs_pain: int | None
    sbp: float | None
    dbp: float | None
    hr: float | None
    rr: float | None
    bt: float | None
    spo2: float | None


def read_ktas_csv(path: str | Path, encoding: str = "cp1254") -> list[Example]:
    """Read the KTAS data (``;``-separated, cp1254) as nurse's-note examples.

    Each visit becomes e.g. "71-year-old man, arrived by private vehicle.
    Complaint: right ocular pain. ..." built from ``KTAS_TEXT_COLUMNS`` only;
    missing values (empty, ``??``, ``#BOŞ!``) are left out. The label is
    ``KTAS_expert``: 1-3 -> ED, 4 -> GP, 5 -> HOME; a visit without it is an error,
    never dropped. The id is ``ktas-<n>`` with ``n`` the 1-based data row (row 1 is
    the line after the header). Every visit is its own group (the visits are
    independent patients), except that visits whose notes are identical share the
    group of the first, so a repeated row cannot sit in train and test at once.

    attrs (written to the prepared JSONL for reports; never part of the prompt):
    ``age_band`` (child <18, adult 18-64, elderly 65+), ``sex``, ``vitals``
    (``abnormal``/``normal``/``missing``, see ``vitals_status``) and
    ``nurse_label``: the triage nurse's own level ``KTAS_RN`` mapped like the
    label (1-3 ED, 4 GP, 5 HOME), the human reference the models are compared
    with. The column is optional; a visit without it gets no ``nurse_label``.
    """
    source = Source(Path(path), encoding)
    header_line, header, records = csv_records(source, delimiter=";")
    require_columns(source, header_line, header, [*KTAS_TEXT_COLUMNS, "KTAS_expert"])
    has_nurse = NURSE_COLUMN in header
    examples = []
    first_with_note: dict[str, str] = {}
    for number, (line, record) in enumerate(records, start=1):
        label = _ktas_code(source, line, record, "KTAS_expert", _KTAS_LABELS)
        if label is None:
            raise source.error(line, "KTAS_expert", "missing; every visit needs the expert's KTAS level (1-5)")
        # Only the door-side columns reach the renderer, so outcomes cannot leak into the text.
        visit = _ktas_visit(source, line, {column: record[column] for column in KTAS_TEXT_COLUMNS})
        example_id = f"ktas-{number}"
        prompt = render_prompt(render_ktas_note(visit))
        # The export repeats a few visits row for row; one copy in train and one in test would leak.
        group = first_with_note.setdefault(prompt, example_id)
        # The nurse's level goes to attrs only: no stage builds a prompt from attrs.
        nurse = _ktas_code(source, line, record, NURSE_COLUMN, _KTAS_LABELS) if has_nurse else None
        attrs = _ktas_attrs(visit) | ({"nurse_label": nurse} if nurse is not None else {})
        examples.append(Example(example_id, prompt, label, label, group, attrs))
    return examples


def _ktas_missing(raw: str) -> bool:
    # "??" is also what the export left of Korean text it could not encode.
    return raw in _KTAS_EMPTY or set(raw) <= {"?", " "}


def _ktas_number(source: Source, line: int, record: Mapping[str, str], column: str) -> float | None:
    raw = source.checked(line, column, record[column]).strip()
    if _ktas_missing(raw):
        return None
    try:
        return float(raw.replace(",", "."))
    except ValueError:
        raise source.error(line, column, f"expected a number, got {raw!r}") from None


def _ktas_code(source: Source, line: int, record: Mapping[str, str], column: str, codes: Mapping[int, T]) -> T | None:
    """The codebook meaning of a coded cell, or None when the cell is missing."""
    value = _ktas_number(source, line, record, column)
    if value is None:
        return None
    if value not in codes:
        raise source.error(line, column, f"unknown code {record[column]!r}; the codebook has {sorted(codes)}")
    return codes[int(value)]


def _ktas_complaint(raw: str) -> str | None:
    """The chief complaint without words lost to '?' (Korean text the export could not encode)."""
    kept = " ".join(word for word in raw.split() if "?" not in word).strip(" ,.;:-")
    return kept or None


def _ktas_visit(source: Source, line: int, record: Mapping[str, str]) -> KtasVisit:
    def number(column: str) -> float | None:
        return _ktas_number(source, line, record, column)

    def code(column: str, codes: Mapping[int, T]) -> T | None:
        return _ktas_code(source, line, record, column, codes)

    age, nrs = number("Age"), code("NRS_pain", {score: score for score in range(11)})
    return KtasVisit(
        age=None if age is None else int(age),
        sex=code("Sex", _KTAS_SEX),
        arrival=code("Arrival mode", _KTAS_ARRIVAL),
        injury=code("Injury", _KTAS_INJURY),
        complaint=_ktas_complaint(source.checked(line, "Chief_complain", record["Chief_complain"])),
        mental=code("Mental", _KTAS_MENTAL),
        pain=code("Pain", _KTAS_PAIN),
        nrs_pain=nrs,
        sbp=number("SBP"),
        dbp=number("DBP"),
        hr=number("HR"),
        rr=number("RR"),
        bt=number("BT"),
        spo2=number("Saturation"),
    )


def _fmt(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:g}"


def render_ktas_note(visit: KtasVisit) -> str:
    """A short triage nurse's note for one visit; facts that were not recorded are left out."""
    person = {"female": "woman", "male": "man"}.get(visit.sex or "", "patient")
    if visit.age is not None and visit.age < 18 and visit.sex:
        person = {"female": "girl", "male": "boy"}[visit.sex]
    who = f"{visit.age}-year-old {person}" if visit.age is not None else person.capitalize()
    sentences = [f"{who}, {visit.arrival}." if visit.arrival else f"{who}."]
    if visit.complaint:
        sentences.append(f"Complaint: {visit.complaint}.")
    if visit.injury:
        sentences.append("Injury-related visit.")
    if visit.mental:
        sentences.append(visit.mental)
    if visit.nrs_pain is not None:
        sentences.append(f"Pain {visit.nrs_pain}/10.")
    elif visit.pain is not None:
        sentences.append("In pain, score not recorded." if visit.pain else "No pain.")
    vitals = _ktas_vitals(visit)
    if vitals:
        sentences.append(vitals[0].upper() + vitals[1:] + ".")
    return " ".join(sentences)


def _ktas_vitals(visit: KtasVisit) -> str:
    if visit.sbp is not None and visit.dbp is not None:
        parts = [f"BP {_fmt(visit.sbp)}/{_fmt(visit.dbp)}"]
    elif visit.sbp is not None:
        parts = [f"systolic BP {_fmt(visit.sbp)}"]
    elif visit.dbp is not None:
        parts = [f"diastolic BP {_fmt(visit.dbp)}"]
    else:
        parts = []
    if visit.hr is not None:
        parts.append(f"pulse {_fmt(visit.hr)}")
    if visit.rr is not None:
        parts.append(f"breathing {_fmt(visit.rr)}/min")
    if visit.bt is not None:
        parts.append(f"temp {visit.bt:.1f} °C")
    if visit.spo2 is not None:
        parts.append(f"SpO2 {_fmt(visit.spo2)}%")
    return ", ".join(parts)


# Vital signs outside these ranges count as abnormal. They are the usual adult
# triage alarm limits, written here for this project (not taken from any one scale):
#   systolic BP below 90 (shock) or above 180 mmHg; diastolic BP above 120 mmHg
#   (the hypertensive-crisis range that goes with systolic 180); pulse below 50 or
#   above 120 /min; breathing below 10 or above 24 /min; temperature below 36.0 °C
#   or 38.5 °C and higher; oxygen saturation below 92%.
# They are adult limits applied to every visit: the youngest KTAS patient is 16.
_VITAL_ABNORMAL: dict[str, Callable[[float], bool]] = {
    "sbp": lambda v: v < 90 or v > 180,
    "dbp": lambda v: v > 120,
    "hr": lambda v: v < 50 or v > 120,
    "rr": lambda v: v < 10 or v > 24,
    "bt": lambda v: v < 36.0 or v >= 38.5,
    "spo2": lambda v: v < 92,
}
# Recorded in all but a few dozen visits; saturation is missing in over half and DBP adds little to SBP.
_CORE_VITALS = ("sbp", "hr", "rr", "bt")


def vitals_status(visit: KtasVisit) -> str:
    """``abnormal`` if any recorded vital sign is outside the limits above; otherwise ``normal``
    when systolic BP, pulse, breathing rate and temperature were all recorded, else ``missing``."""
    for name, abnormal in _VITAL_ABNORMAL.items():
        value = getattr(visit, name)
        if value is not None and abnormal(value):
            return "abnormal"
    return "normal" if all(getattr(visit, name) is not None for name in _CORE_VITALS) else "missing"


def _ktas_attrs(visit: KtasVisit) -> dict[str, str]:
    attrs = {}
    if visit.age is not None:
        attrs["age_band"] = "child" if visit.age < 18 else "adult" if visit.age < 65 else "elderly"
    if visit.sex is not None:
        attrs["sex"] = visit.sex
    attrs["vitals"] = vitals_status(visit)
    return attrs
