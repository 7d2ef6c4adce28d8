"""Readers that bring user-provided triage data into the pipeline as Examples.

Formats: prompt/completion JSONL (the seeds' format, one file or a directory of
``train/valid/test.jsonl``), chat JSONL (``{"messages": [...]}``), a generic CSV
or JSONL table with configurable columns and a label mapping, and the public
KTAS emergency-department triage data (Moon et al. 2019, PLOS ONE).

Every reader returns the complete list of examples or raises ``DataError``
naming the file, the 1-based physical line and the field; none writes a file.
A byte that is not valid in the file's encoding is reported on the line and in
the field where it occurs: files are decoded with ``surrogateescape`` so the
bad byte survives as a lone surrogate until the field holding it is read.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from triage.schema import LABELS, DataError, Example, label_of, render_prompt

SPLITS: tuple[str, ...] = ("train", "valid", "test")
"""Split names, and the ``<name>.jsonl`` files a split directory must hold."""

Record = Mapping[str, object]
T = TypeVar("T")


# --------------------------------------------------------------------------- #
# Reading and checking raw records
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Source:
    """One input file and its encoding, so every error can name both."""

    path: Path
    encoding: str

    def error(self, line: int | None, field_name: str | None, message: str) -> DataError:
        return DataError(self.path, line, field_name, message)

    def read(self) -> str:
        """The decoded text; undecodable bytes are kept as lone surrogates."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise self.error(None, None, "file not found") from None
        except IsADirectoryError:
            raise self.error(None, None, "is a directory, expected a file") from None
        try:
            text = data.decode(self.encoding, errors="surrogateescape")
        except LookupError:
            raise self.error(None, "encoding", f"unknown encoding {self.encoding!r}") from None
        return text.removeprefix("\ufeff")

    def checked(self, line: int, field_name: str | None, value: str) -> str:
        """``value`` unchanged, or an error if it holds a byte the encoding could not decode."""
        bad = next((ord(char) - 0xDC00 for char in value if "\udc80" <= char <= "\udcff"), None)
        if bad is not None:
            raise self.error(line, field_name, _encoding_hint(bad, self.encoding))
        return value

    def text(self, line: int, record: Record, key: str, field_name: str | None = None) -> str:
        """The non-blank string ``record[key]``; ``field_name`` overrides the name errors show."""
        name = field_name or key
        if key not in record or record[key] is None:
            raise self.error(line, name, "missing")
        value = record[key]
        if not isinstance(value, str):
            raise self.error(line, name, f"must be a string, got {_type_name(value)}")
        if not self.checked(line, name, value).strip():
            raise self.error(line, name, "is empty")
        return value


def _encoding_hint(byte: int, encoding: str) -> str:
    return (
        f"byte 0x{byte:02X} is not valid {encoding}; the file is probably in another "
        "encoding: pass it with encoding=... (e.g. encoding='cp1252') or re-save the file as UTF-8"
    )


def _type_name(value: object) -> str:
    """JSON's name for a parsed value's type, as a user wrote it."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def _jsonl_records(source: _Source) -> list[tuple[int, dict]]:
    """``(line, object)`` for every non-blank line; an empty file is an error."""
    records = []
    for number, line in enumerate(source.read().split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            # A stray byte outside a JSON string breaks parsing; name the encoding, not the syntax.
            source.checked(number, None, line)
            raise source.error(number, None, f"invalid JSON: {err.msg} at column {err.colno}") from None
        except RecursionError:
            raise source.error(number, None, "invalid JSON: nested too deeply to read") from None
        if not isinstance(record, dict):
            raise source.error(number, None, f"expected a JSON object, got {_type_name(record)}")
        records.append((number, record))
    if not records:
        raise source.error(None, None, "file is empty: no records")
    return records


def _csv_records(source: _Source, delimiter: str) -> tuple[int, list[str], list[tuple[int, dict[str, str]]]]:
    """The header's line, its column names, and ``(line, row)`` for every data row.

    ``line`` is the physical line a row starts on, which differs from the row's
    index once a quoted cell spans several lines. Blank lines are skipped.
    """
    reader = csv.reader(io.StringIO(source.read(), newline=""), delimiter=delimiter, strict=True)
    header: list[str] = []
    header_line = 0
    rows: list[tuple[int, dict[str, str]]] = []
    start = 1
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                if not header:
                    header, header_line = [cell.strip() for cell in cells], start
                    duplicated = sorted(name for name, count in Counter(header).items() if count > 1)
                    if duplicated:
                        raise source.error(start, duplicated[0], "column appears more than once in the header")
                elif len(cells) != len(header):
                    raise source.error(
                        start, None, f"has {len(cells)} fields but the header (line {header_line}) has {len(header)}"
                    )
                else:
                    rows.append((start, dict(zip(header, cells))))
            start = reader.line_num + 1
    except csv.Error as err:
        raise source.error(reader.line_num, None, f"malformed CSV: {err}") from None
    if not header:
        raise source.error(None, None, "file is empty: no header and no rows")
    if not rows:
        raise source.error(None, None, "file has a header but no data rows")
    return header_line, header, rows


def _require_columns(source: _Source, header_line: int, header: Sequence[str], columns: Iterable[str]) -> None:
    for column in columns:
        if column not in header:
            raise source.error(header_line, column, f"column not found; the header has: {', '.join(header)}")


def _record_id(source: _Source, line: int, record: Record, key: str | None) -> str:
    """``record[key]`` (a string or integer) as the id, or ``<file stem>-<line>`` when ``key`` is None."""
    if key is None:
        return f"{source.path.stem}-{line}"
    value = record.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return source.text(line, record, key).strip()


def _check_unique_ids(source: _Source, rows: Iterable[tuple[int, Example]]) -> None:
    first_line: dict[str, int] = {}
    for line, example in rows:
        if example.id in first_line:
            raise source.error(
                line, "id", f"duplicate id {example.id!r} (first on line {first_line[example.id]}); ids must be unique"
            )
        first_line[example.id] = line


def _string_attrs(source: _Source, line: int, record: Record, reserved: frozenset[str]) -> dict[str, str]:
    """Subgroup attributes: a nested ``attrs`` object's and the record's other non-blank string fields."""
    nested = record.get("attrs")
    candidates = list(nested.items()) if isinstance(nested, dict) else []
    candidates += [(key, value) for key, value in record.items() if key not in reserved]
    return {
        key: source.checked(line, key, value).strip()
        for key, value in candidates
        if isinstance(value, str) and value.strip()
    }


def _optional_key(record: Record, key: str) -> str | None:
    """``key`` when the record has a non-null value for it, else None."""
    return key if record.get(key) is not None else None


def _completion_label(source: _Source, line: int, field_name: str, completion: str) -> str:
    label = label_of(completion)
    if label is None:
        start = completion.strip().split(maxsplit=1)[0]
        raise source.error(
            line, field_name, f"unknown label: must start with one of {', '.join(LABELS)}, starts with {start!r}"
        )
    return label


def _label_first_examples(source: _Source, rows: list[tuple[int, Example]]) -> list[tuple[int, Example]]:
    """``rows`` with whitespace before each completion's label removed, and one note when any had some.

    A completion in the common OpenAI style, " ED - ...", or "\nED", starts
    with another token (" ED", a newline) than the "ED" that evaluation and the
    cost term score, so cross-entropy would train a token nothing reads.
    """
    completions = [example.completion.lstrip() for _, example in rows]
    changed = sum(new != example.completion for new, (_, example) in zip(completions, rows))
    if changed:
        print(f"[import] {source.path}: {changed} of {len(rows)} completions had whitespace before the label; "
              "removed it, so training reads the label token that evaluation scores")
    return [(line, replace(example, completion=completion))
            for (line, example), completion in zip(rows, completions)]


# --------------------------------------------------------------------------- #
# Prompt/completion JSONL
# --------------------------------------------------------------------------- #

_PROMPT_COMPLETION_FIELDS = frozenset({"id", "group", "prompt", "completion", "label", "attrs"})


def _prompt_completion_rows(source: _Source) -> list[tuple[int, Example]]:
    rows = []
    for line, record in _jsonl_records(source):
        prompt = source.text(line, record, "prompt")
        completion = source.text(line, record, "completion")
        label = _completion_label(source, line, "completion", completion)
        # Prepared splits carry a ``label`` too; a disagreeing one means a hand edit went wrong.
        if "label" in record and record["label"] != label:
            raise source.error(line, "label", f"is {record['label']!r} but the completion starts with {label!r}")
        example_id = _record_id(source, line, record, _optional_key(record, "id"))
        group = source.text(line, record, "group").strip() if _optional_key(record, "group") else example_id
        attrs = _string_attrs(source, line, record, _PROMPT_COMPLETION_FIELDS)
        rows.append((line, Example(example_id, prompt, completion, label, group, attrs)))
    _check_unique_ids(source, rows)
    return _label_first_examples(source, rows)


def read_prompt_completion_jsonl(path: str | Path, encoding: str = "utf-8") -> list[Example]:
    """Read ``{"prompt", "completion"}`` lines, keeping both verbatim but for whitespace before the label.

    The label is the completion's first word (``ED``, ``GP`` or ``HOME``). Optional
    fields: ``id`` (string or integer; default ``<file stem>-<line>``), ``group``
    (default: the id), ``label`` (must agree with the completion), ``attrs`` (an
    object); any other string field, e.g. ``age_band`` or ``sex``, becomes an
    attribute, while non-string extras are ignored.
    """
    return [example for _, example in _prompt_completion_rows(_Source(Path(path), encoding))]


def read_prompt_completion_splits(directory: str | Path, encoding: str = "utf-8") -> dict[str, list[Example]]:
    """Read ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` from ``directory``.

    Beyond each file's own checks: ids are unique across the three files, no
    group straddles two splits (that would leak a case into evaluation), and
    every split holds every class (see ``check_class_coverage``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(directory, None, None, f"not a directory; expected one holding {_split_files()}")
    rows: dict[str, list[tuple[int, Example]]] = {}
    for name in SPLITS:
        path = directory / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(path, None, None, f"split file missing; {directory} must hold {_split_files()}")
        rows[name] = _prompt_completion_rows(_Source(path, encoding))
    _check_disjoint_splits(directory, rows, "id", lambda example: example.id)
    _check_disjoint_splits(directory, rows, "group", lambda example: example.group)
    splits = {name: [example for _, example in split_rows] for name, split_rows in rows.items()}
    check_class_coverage(splits, str(directory))
    return splits


def _split_files() -> str:
    return ", ".join(f"{name}.jsonl" for name in SPLITS)


def _check_disjoint_splits(
    directory: Path, rows: Mapping[str, list[tuple[int, Example]]], field_name: str, key: Callable[[Example], str]
) -> None:
    seen: dict[str, str] = {}
    for name, split_rows in rows.items():
        first_line: dict[str, int] = {}
        for line, example in split_rows:
            first_line.setdefault(key(example), line)
        for value, line in first_line.items():
            if value in seen:
                raise DataError(
                    directory / f"{name}.jsonl", line, field_name,
                    f"{field_name} {value!r} is also in {seen[value]}.jsonl; a case must stay in one split",
                )
            seen[value] = name


def check_class_coverage(splits: Mapping[str, Sequence[Example]], source: str) -> None:
    """Raise ``DataError`` naming the split and class(es) when a split lacks a class.

    Per-class recall (ED recall is a safety gate) is undefined on a split without
    that class, and training without it cannot learn it.
    """
    for name, examples in splits.items():
        counts = Counter(example.label for example in examples)
        missing = [label for label in LABELS if counts[label] == 0]
        if missing:
            have = ", ".join(f"{label}={counts[label]}" for label in LABELS)
            raise DataError(
                source, None, "label",
                f"split {name!r} has no examples of class {' or '.join(missing)} ({have}); "
                "every split needs every class",
            )


# --------------------------------------------------------------------------- #
# Chat JSONL
# --------------------------------------------------------------------------- #

_CHAT_FIELDS = frozenset({"id", "group", "messages", "attrs"})
_ROLES = ("system", "user", "assistant")


def read_chat_jsonl(path: str | Path, encoding: str = "utf-8") -> list[Example]:
    """Read ``{"messages": [{"role", "content"}, ...]}`` conversations.

    The conversation must end with an assistant message: it is the completion
    and must start with the label. The patient text is every user message before
    it, in order, joined by newlines; earlier assistant turns (follow-up
    questions) and system messages are dropped. ``id``, ``group`` and extra
    string fields are handled as in ``read_prompt_completion_jsonl``.
    """
    source = _Source(Path(path), encoding)
    rows = []
    for line, record in _jsonl_records(source):
        turns = _chat_turns(source, line, record)
        if not turns or turns[-1][1] != "assistant":
            raise source.error(line, "messages", "must end with the assistant's answer (the triage label)")
        answer_index, _, completion = turns[-1]
        said = [content.strip() for _, role, content in turns[:-1] if role == "user"]
        if not said:
            raise source.error(line, "messages", "has no user message before the assistant's answer")
        label = _completion_label(source, line, f"messages[{answer_index}].content", completion)
        example_id = _record_id(source, line, record, _optional_key(record, "id"))
        group = source.text(line, record, "group").strip() if _optional_key(record, "group") else example_id
        attrs = _string_attrs(source, line, record, _CHAT_FIELDS)
        rows.append((line, Example(example_id, render_prompt("\n".join(said)), completion, label, group, attrs)))
    _check_unique_ids(source, rows)
    return [example for _, example in _label_first_examples(source, rows)]


def _chat_turns(source: _Source, line: int, record: Record) -> list[tuple[int, str, str]]:
    """``(index, role, content)`` of every non-system message."""
    messages = record.get("messages")
    if messages is None:
        raise source.error(line, "messages", "missing")
    if not isinstance(messages, list) or not messages:
        raise source.error(line, "messages", f"must be a non-empty array, got {_type_name(messages)}")
    turns = []
    for index, message in enumerate(messages):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            raise source.error(line, name, f"must be an object, got {_type_name(message)}")
        role = source.text(line, message, "role", f"{name}.role")
        if role not in _ROLES:
            raise source.error(line, f"{name}.role", f"unknown role {role!r}; expected one of {', '.join(_ROLES)}")
        if role != "system":
            turns.append((index, role, source.text(line, message, "content", f"{name}.content")))
    return turns


# --------------------------------------------------------------------------- #
# Generic tables
# --------------------------------------------------------------------------- #


def read_table(
    path: str | Path,
    fmt: str,
    text_field: str,
    label_field: str,
    label_map: Mapping[str, str] | None = None,
    id_field: str | None = None,
    attr_fields: Sequence[str] = (),
    encoding: str = "utf-8",
    delimiter: str = ",",
    group_field: str | None = None,
) -> list[Example]:
    """Read a CSV (with a header row) or JSONL table of patient messages and labels.

    ``fmt`` is ``"csv"`` or ``"jsonl"``. The prompt is ``render_prompt`` of
    ``text_field``; the completion is the label. ``label_map`` maps the table's
    labels to ED/GP/HOME with case-insensitive keys (``{"emergent": "ED"}``);
    labels already named ED, GP or HOME (any case) pass through unmapped.
    ``id_field`` defaults to ``<file stem>-<line>``, ``group_field`` to the id;
    blank ``attr_fields`` cells are left out of ``attrs``. ``delimiter`` is CSV only.
    """
    source = _Source(Path(path), encoding)
    mapping = _normalised_label_map(source, label_map or {})
    if fmt == "csv":
        header_line, header, records = _csv_records(source, delimiter)
        optional = [name for name in (id_field, group_field) if name is not None]
        _require_columns(source, header_line, header, [text_field, label_field, *optional, *attr_fields])
    elif fmt == "jsonl":
        records = _jsonl_records(source)
    else:
        raise source.error(None, "fmt", f"unknown table format {fmt!r}; expected 'csv' or 'jsonl'")
    rows = []
    for line, record in records:
        text = source.text(line, record, text_field)
        label = _mapped_label(source, line, label_field, _scalar_text(source, line, record, label_field), mapping)
        example_id = _record_id(source, line, record, id_field)
        group = _scalar_text(source, line, record, group_field).strip() if group_field else example_id
        attrs = {name: value.strip() for name in attr_fields
                 if (value := _optional_scalar(source, line, record, name)) and value.strip()}
        rows.append((line, Example(example_id, render_prompt(text), label, label, group, attrs)))
    _check_unique_ids(source, rows)
    return [example for _, example in rows]


def _optional_scalar(source: _Source, line: int, record: Record, key: str) -> str | None:
    """``record[key]`` as text (strings and numbers), or None when absent or null."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise source.error(line, key, f"must be a string or number, got {_type_name(value)}")
    return source.checked(line, key, value) if isinstance(value, str) else json.dumps(value)


def _scalar_text(source: _Source, line: int, record: Record, key: str) -> str:
    value = _optional_scalar(source, line, record, key)
    if value is None:
        raise source.error(line, key, "missing")
    if not value.strip():
        raise source.error(line, key, "is empty")
    return value


def _normalised_label_map(source: _Source, label_map: Mapping[str, str]) -> dict[str, str]:
    """``label_map`` with case-folded keys, after checking every target is a label."""
    normalised: dict[str, str] = {}
    for key, target in label_map.items():
        if target not in LABELS:
            raise source.error(None, "label_map", f"{key!r} maps to {target!r}; targets must be one of {LABELS}")
        folded = key.strip().casefold()
        if normalised.get(folded, target) != target:
            raise source.error(None, "label_map", f"keys equal up to case map to different labels: {key!r}")
        normalised[folded] = target
    return normalised


def _mapped_label(source: _Source, line: int, field_name: str, raw: str, mapping: Mapping[str, str]) -> str:
    key = raw.strip().casefold()
    if key in mapping:
        return mapping[key]
    if key.upper() in LABELS:
        return key.upper()
    shown = ", ".join(f"{source_label!r} -> {target}" for source_label, target in mapping.items()) or "none given"
    raise source.error(
        line, field_name, f"unknown label {raw.strip()!r}; allowed: {', '.join(LABELS)}; label_map (any case): {shown}"
    )


# --------------------------------------------------------------------------- #
# KTAS emergency-department triage data (Moon et al. 2019)
# --------------------------------------------------------------------------- #

KTAS_TEXT_COLUMNS: tuple[str, ...] = (
    "Sex", "Age", "Arrival mode", "Injury", "Chief_complain", "Mental", "Pain", "NRS_pain",
    "SBP", "DBP", "HR", "RR", "BT", "Saturation",
)
"""The only columns the rendered note is built from: what a triage nurse knows at the door."""

KTAS_OUTCOME_COLUMNS: tuple[str, ...] = (
    "KTAS_RN", "Diagnosis in ED", "Disposition", "Error_group", "Length of stay_min", "KTAS duration_min", "mistriage",
)
"""Known only after triage (or derived from the label); never shown to the model."""

_KTAS_LABELS = {1: "ED", 2: "ED", 3: "ED", 4: "GP", 5: "HOME"}
# Codebook of the public release (Moon et al. 2019, PLOS ONE; the Kaggle description).
_KTAS_SEX = {1: "female", 2: "male"}
_KTAS_ARRIVAL = {
    1: "walked in", 2: "arrived by public ambulance", 3: "arrived by private vehicle",
    4: "arrived by private ambulance", 5: "arrived by other transport", 6: "arrived by other transport",
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
    the line after the header); visits whose notes are identical share the group
    of the first. attrs: ``age_band`` (child <18, adult 18-64, elderly 65+) and ``sex``.
    """
    source = _Source(Path(path), encoding)
    header_line, header, records = _csv_records(source, delimiter=";")
    _require_columns(source, header_line, header, [*KTAS_TEXT_COLUMNS, "KTAS_expert"])
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
        examples.append(Example(example_id, prompt, label, label, group, _ktas_attrs(visit)))
    return examples


def _ktas_missing(raw: str) -> bool:
    # "??" is also what the export left of Korean text it could not encode.
    return raw in _KTAS_EMPTY or set(raw) <= {"?", " "}


def _ktas_number(source: _Source, line: int, record: Mapping[str, str], column: str) -> float | None:
    raw = source.checked(line, column, record[column]).strip()
    if _ktas_missing(raw):
        return None
    try:
        return float(raw.replace(",", "."))
    except ValueError:
        raise source.error(line, column, f"expected a number, got {raw!r}") from None


def _ktas_code(source: _Source, line: int, record: Mapping[str, str], column: str, codes: Mapping[int, T]) -> T | None:
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


def _ktas_visit(source: _Source, line: int, record: Mapping[str, str]) -> KtasVisit:
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
        sbp=number("SBP"), dbp=number("DBP"), hr=number("HR"), rr=number("RR"), bt=number("BT"),
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


def _ktas_attrs(visit: KtasVisit) -> dict[str, str]:
    attrs = {}
    if visit.age is not None:
        attrs["age_band"] = "child" if visit.age < 18 else "adult" if visit.age < 65 else "elderly"
    if visit.sex is not None:
        attrs["sex"] = visit.sex
    return attrs


# --------------------------------------------------------------------------- #
# Sequence length
# --------------------------------------------------------------------------- #


def check_lengths(
    path: str | Path,
    examples: Sequence[Example],
    count_tokens: Callable[[str], int],
    max_len: int,
    line_of: Mapping[str, int] | None = None,
) -> None:
    """Raise ``DataError`` if any example's prompt + completion exceeds ``max_len`` tokens.

    Examples are never truncated: a cut prompt could drop the very symptom that
    decides the label. The error names the first over-long example (its line
    from ``line_of`` when given) and how many more there are. ``count_tokens``
    counts one string; prompt and completion are counted separately and added,
    so any chat-template overhead belongs in ``count_tokens`` or ``max_len``.
    """
    over = []
    for example in examples:
        prompt, completion = count_tokens(example.prompt), count_tokens(example.completion)
        if prompt + completion > max_len:
            over.append((example, prompt, completion))
    if over:
        example, prompt, completion = over[0]
        more = f"; {len(over) - 1} more example(s) are also too long" if len(over) > 1 else ""
        raise DataError(
            path, (line_of or {}).get(example.id), "prompt" if prompt >= completion else "completion",
            f"example {example.id!r} is {prompt} + {completion} = {prompt + completion} tokens (prompt + completion), "
            f"over the maximum sequence length {max_len}{more}; shorten it or raise max_seq_length",
        )
