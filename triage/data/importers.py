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

from triage.schema import LABELS, SPLITS, DataError, Example, label_of, render_prompt

"""Split names, and the ``<name>.jsonl`` files a split directory must hold."""

Record = Mapping[str, object]
T = TypeVar("T")


@dataclass(frozen=True)
class Source:
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


def _jsonl_records(source: Source) -> list[tuple[int, dict]]:
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


def csv_records(source: Source, delimiter: str) -> tuple[int, list[str], list[tuple[int, dict[str, str]]]]:
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


def require_columns(source: Source, header_line: int, header: Sequence[str], columns: Iterable[str]) -> None:
    for column in columns:
        if column not in header:
            raise source.error(header_line, column, f"column not found; the header has: {', '.join(header)}")


def _record_id(source: Source, line: int, record: Record, key: str | None) -> str:
    """``record[key]`` (a string or integer) as the id, or ``<file stem>-<line>`` when ``key`` is None."""
    if key is None:
        return f"{source.path.stem}-{line}"
    value = record.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return source.text(line, record, key).strip()


def _check_unique_ids(source: Source, rows: Iterable[tuple[int, Example]]) -> None:
    first_line: dict[str, int] = {}
    for line, example in rows:
        if example.id in first_line:
            raise source.error(
                line, "id", f"duplicate id {example.id!r} (first on line {first_line[example.id]}); ids must be unique"
            )
        first_line[example.id] = line


def _string_attrs(source: Source, line: int, record: Record, reserved: frozenset[str]) -> dict[str, str]:
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


def _completion_label(source: Source, line: int, field_name: str, completion: str) -> str:
    label = label_of(completion)
    if label is None:
        start = completion.strip().split(maxsplit=1)[0]
        raise source.error(
            line, field_name, f"unknown label: must start with one of {', '.join(LABELS)}, starts with {start!r}"
        )
    return label


def _label_first_examples(source: Source, rows: list[tuple[int, Example]]) -> list[tuple[int, Example]]:
    """``rows`` with whitespace before each completion's label removed, and one note when any had some.

    A completion in the common OpenAI style, " ED - ...", or "\nED", starts
    with another token (" ED", a newline) than the "ED" that evaluation and the
    cost term score, so cross-entropy would train a token nothing reads.
    """
    completions = [example.completion.lstrip() for _, example in rows]
    changed = sum(new != example.completion for new, (_, example) in zip(completions, rows))
    if changed:
        print(
            f"[import] {source.path}: {changed} of {len(rows)} completions had whitespace before the label; "
            "removed it, so training reads the label token that evaluation scores"
        )
    return [(line, replace(example, completion=completion)) for (line, example), completion in zip(rows, completions)]


_PROMPT_COMPLETION_FIELDS = frozenset({"id", "group", "prompt", "completion", "label", "attrs"})


def _prompt_completion_rows(source: Source) -> list[tuple[int, Example]]:
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
    return [example for _, example in _prompt_completion_rows(Source(Path(path), encoding))]


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
        rows[name] = _prompt_completion_rows(Source(path, encoding))
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
                    directory / f"{name}.jsonl",
                    line,
                    field_name,
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
                source,
                None,
                "label",
                f"split {name!r} has no examples of class {' or '.join(missing)} ({have}); "
                "every split needs every class",
            )


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
    source = Source(Path(path), encoding)
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


def _chat_turns(source: Source, line: int, record: Record) -> list[tuple[int, str, str]]:
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
    source = Source(Path(path), encoding)
    mapping = _normalised_label_map(source, label_map or {})
    if fmt == "csv":
        header_line, header, records = csv_records(source, delimiter)
        optional = [name for name in (id_field, group_field) if name is not None]
        require_columns(source, header_line, header, [text_field, label_field, *optional, *attr_fields])
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
        attrs = {
            name: value.strip()
            for name in attr_fields
            if (value := _optional_scalar(source, line, record, name)) and value.strip()
        }
        rows.append((line, Example(example_id, render_prompt(text), label, label, group, attrs)))
    _check_unique_ids(source, rows)
    return [example for _, example in rows]


def _optional_scalar(source: Source, line: int, record: Record, key: str) -> str | None:
    """``record[key]`` as text (strings and numbers), or None when absent or null."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise source.error(line, key, f"must be a string or number, got {_type_name(value)}")
    return source.checked(line, key, value) if isinstance(value, str) else json.dumps(value)


def _scalar_text(source: Source, line: int, record: Record, key: str) -> str:
    value = _optional_scalar(source, line, record, key)
    if value is None:
        raise source.error(line, key, "missing")
    if not value.strip():
        raise source.error(line, key, "is empty")
    return value


def _normalised_label_map(source: Source, label_map: Mapping[str, str]) -> dict[str, str]:
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


def _mapped_label(source: Source, line: int, field_name: str, raw: str, mapping: Mapping[str, str]) -> str:
    key = raw.strip().casefold()
    if key in mapping:
        return mapping[key]
    if key.upper() in LABELS:
        return key.upper()
    shown = ", ".join(f"{source_label!r} -> {target}" for source_label, target in mapping.items()) or "none given"
    raise source.error(
        line, field_name, f"unknown label {raw.strip()!r}; allowed: {', '.join(LABELS)}; label_map (any case): {shown}"
    )
