"""Fuzzing the two doors user input comes through: params.yaml and data files.

Whatever a user writes, loading ends in a result or in the project's own error
(ParamsError, DataError) naming where the problem is: never another exception,
never a silently assumed value.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from triage.config import Params, ParamsError, load_params
from triage.data.importers import read_prompt_completion_jsonl, read_table
from triage.schema import LABELS, DataError

FUZZ = settings(max_examples=100, deadline=None, database=None)

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())
KeyPath = tuple  # of str (mapping keys) and int (list indices)


# --------------------------------------------------------------------------- #
# params.yaml
# --------------------------------------------------------------------------- #


def dotted(path: KeyPath) -> str:
    """``('run', 'models', 0)`` as params errors spell it: ``run.models[0]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def leaf_paths(tree: object, path: KeyPath = ()) -> list[KeyPath]:
    """Paths of every scalar, empty mapping and empty list in ``tree``."""
    if isinstance(tree, dict) and tree:
        return [leaf for key, value in tree.items() for leaf in leaf_paths(value, (*path, key))]
    if isinstance(tree, list) and tree:
        return [leaf for i, value in enumerate(tree) for leaf in leaf_paths(value, (*path, i))]
    return [path]


def key_paths(tree: object, path: KeyPath = ()) -> list[KeyPath]:
    """Paths of every mapping key in ``tree``, at any depth."""
    if not isinstance(tree, dict):
        return []
    return [found for key, value in tree.items() for found in [(*path, key), *key_paths(value, (*path, key))]]


def value_at(tree: object, path: KeyPath) -> object:
    for part in path:
        tree = tree[part]
    return tree


def declared_type(path: KeyPath) -> object:
    """The type triage.config declares for the value at ``path``, with Optional removed."""
    kind: object = Params
    for part in path:
        kind = typing.get_type_hints(kind)[part] if is_dataclass(kind) else typing.get_args(kind)[-1]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            (kind,) = [option for option in typing.get_args(kind) if option is not type(None)]
    return kind


def may_be_absent(path: KeyPath) -> bool:
    """A field with a declared default, or a model or config that `run:` does not select."""
    parent = declared_type(path[:-1])
    if is_dataclass(parent):
        return next(f for f in fields(parent) if f.name == path[-1]).default is not MISSING
    return path[:-1] in (("models",), ("configs",)) and path[-1] not in BASE["run"][path[0]]


TEXT = st.text(max_size=12)
INTEGERS = st.integers(-(10**9), 10**9)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
BOOLEANS = st.booleans()
LISTS = st.lists(INTEGERS | TEXT, min_size=1, max_size=3)
MAPPINGS = st.dictionaries(st.text(min_size=1, max_size=6), INTEGERS | TEXT, min_size=1, max_size=3)
ANY_VALUE = TEXT | INTEGERS | FLOATS | BOOLEANS | LISTS | MAPPINGS | st.none()


def wrong_type_for(value: object) -> st.SearchStrategy:
    """Values that can never stand where ``value`` stands (an int is a valid float, None a valid Optional)."""
    if isinstance(value, bool):
        return TEXT | INTEGERS | FLOATS | LISTS | MAPPINGS
    if isinstance(value, int):
        return TEXT | BOOLEANS | FLOATS | LISTS | MAPPINGS
    if isinstance(value, float):
        return TEXT | BOOLEANS | LISTS | MAPPINGS
    if isinstance(value, str):
        return INTEGERS | FLOATS | BOOLEANS | LISTS | MAPPINGS
    if value is None:
        return LISTS | MAPPINGS
    if isinstance(value, list):
        return TEXT | INTEGERS | BOOLEANS | MAPPINGS
    return TEXT | INTEGERS | BOOLEANS | LISTS


def load_mutated(params: dict, directory: Path):
    """load_params on ``params`` written as YAML; the Params, or the ParamsError raised."""
    path = directory / "params.yaml"
    text = yaml.dump(params, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True)
    assert (
        yaml.dump(
            yaml.load(text, Loader=yaml.CSafeLoader), Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True
        )
        == text
    ), "the YAML round trip changed the mutation"
    path.write_text(text, encoding="utf-8")
    try:
        return load_params(path)
    except ParamsError as error:
        assert str(error).startswith(f"{path}: "), error
        return error


def on_one_branch(a: str, b: str) -> bool:
    """Whether dotted keys ``a`` and ``b`` are the same or one lies below the other."""
    return a == b or any(low.startswith(high + sep) for low, high in ((a, b), (b, a)) for sep in ".[")


def names_the_key(error: ParamsError, path: KeyPath) -> bool:
    """The message quotes ``path``, a key above or below it, or (for a model or config) the run entry naming it."""
    for key in re.findall(r"'([^'\s]+)'", str(error)):
        if on_one_branch(key, dotted(path)):
            return True
        if len(path) == 2 and path[0] in ("models", "configs") and key.startswith(f"run.{path[0]}["):
            return True
    return False


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.data())
def test_a_wrong_typed_value_is_refused_by_name(scratch, data):
    path = data.draw(st.sampled_from(leaf_paths(BASE)), label="leaf")
    params = copy.deepcopy(BASE)
    value_at(params, path[:-1])[path[-1]] = data.draw(wrong_type_for(value_at(BASE, path)), label="value")
    result = load_mutated(params, scratch)
    assert isinstance(result, ParamsError), f"{dotted(path)} accepted a wrong-typed value"
    assert names_the_key(result, path), result


@FUZZ
@given(path=st.sampled_from(key_paths(BASE)))
def test_a_deleted_key_is_refused_by_name_unless_it_may_be_absent(scratch, path):
    params = copy.deepcopy(BASE)
    del value_at(params, path[:-1])[path[-1]]
    result = load_mutated(params, scratch)
    if isinstance(result, ParamsError):
        assert names_the_key(result, path), result
    else:
        assert may_be_absent(path), f"without {dotted(path)} params.yaml still loaded: a silent default"


DATACLASS_LEVELS = [path for path in [(), *key_paths(BASE)] if is_dataclass(declared_type(path))]


@FUZZ
@given(data=st.data())
def test_an_unknown_key_is_refused_by_name(scratch, data):
    parent = data.draw(st.sampled_from(DATACLASS_LEVELS), label="parent")
    declared = {f.name for f in fields(declared_type(parent))}
    key = data.draw(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda k: k not in declared))
    params = copy.deepcopy(BASE)
    value_at(params, parent)[key] = data.draw(ANY_VALUE, label="value")
    result = load_mutated(params, scratch)
    assert isinstance(result, ParamsError), f"unknown key {dotted((*parent, key))} accepted"
    assert f"unknown key '{dotted((*parent, key))}'" in str(result), result


FLOAT_LEAVES = [path for path in leaf_paths(BASE) if isinstance(value_at(BASE, path), float)]


@FUZZ
@given(path=st.sampled_from(FLOAT_LEAVES), value=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_a_non_finite_number_is_refused_by_name(scratch, path, value):
    params = copy.deepcopy(BASE)
    value_at(params, path[:-1])[path[-1]] = value
    result = load_mutated(params, scratch)
    assert isinstance(result, ParamsError), f"{dotted(path)}: {value} accepted"
    assert names_the_key(result, path), result


def test_a_study_without_configs_is_refused_by_name(scratch):
    params = copy.deepcopy(BASE)
    params["configs"], params["run"]["configs"] = {}, []
    result = load_mutated(params, scratch)
    assert isinstance(result, ParamsError) and "'configs" in str(result), result


# --------------------------------------------------------------------------- #
# Data files
# --------------------------------------------------------------------------- #

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
LABEL_LIKE = st.sampled_from(["ED", "GP", "HOME", "ED: chest pain", "home", "Emergent", "urgent", "", " ", "GP."])
MESSAGE_LIKE = st.sampled_from(["crushing chest pain", "sore throat for 2 days", "", "   "]) | st.text(max_size=20)
MALFORMED_LINE = (
    st.one_of(
        JSON_VALUES.map(json.dumps),
        st.text(max_size=30),
        st.sampled_from(['{"prompt": "a", "completion": ', '{"text": "a" "label": "ED"}', "   ", ""]),
    ).map(str.encode)
    | st.binary(max_size=20)
).map(lambda raw: raw.replace(b"\n", b" "))


def with_one_malformed_line(lines: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A file of up to five plausible lines and at most one malformed line among them."""
    return (
        st.tuples(st.lists(lines, max_size=5), st.lists(MALFORMED_LINE, max_size=1))
        .flatmap(lambda parts: st.permutations(parts[0] + parts[1]))
        .map(b"\n".join)
    )


def jsonl_file(required: dict[str, st.SearchStrategy], optional: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    """Records whose required fields look right and whose optional fields hold any JSON value."""
    record = st.fixed_dictionaries(required, optional={name: LABEL_LIKE | JSON_VALUES for name in optional})
    return with_one_malformed_line(record.map(lambda r: json.dumps(r, ensure_ascii=False).encode()))


def csv_row(cells: list[str]) -> bytes:
    """One CSV record, quoted as a spreadsheet would (a cell may span lines)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(cells)
    return buffer.getvalue().encode()


CSV_FILE = st.tuples(  # the expected header half the time, else a wrong one
    st.just(b"text,label") | st.sampled_from([b"label,text,note", b"text", b"text,label,text", b"", b'"text,label']),
    with_one_malformed_line(st.tuples(MESSAGE_LIKE, LABEL_LIKE).map(list).map(csv_row)),
).map(b"\n".join)


def physical_lines(content: bytes, csv_module: bool) -> list[str]:
    """The lines a reader numbers: split at "\\n" (JSONL) or at every universal newline (the csv module)."""
    text = content.decode("utf-8", errors="surrogateescape")
    return io.StringIO(text, newline="").readlines() if csv_module else text.split("\n")


def check_reader(read, path: Path, content: bytes, csv_module: bool = False) -> None:
    """``read`` returns labelled examples or raises a DataError naming this file and a line holding a record."""
    path.write_bytes(content)
    try:
        examples = read(path)
    except DataError as error:
        assert error.path == str(path) and str(error).startswith(str(path)), error
        if error.line is None:  # only a problem of the whole file has no line
            assert re.search(r"empty|no data rows", str(error)), error
        else:
            lines = physical_lines(content, csv_module)
            assert 1 <= error.line <= len(lines), error
            assert csv_module or lines[error.line - 1].strip(), f"{error} points at a blank line"
    else:
        assert examples and all(example.label in LABELS for example in examples)


def table_reader(fmt: str):
    """read_table for a table with text and label columns and a small label map."""
    return lambda path: read_table(path, fmt, "text", "label", {"emergent": "ED", "urgent": "GP"})


@FUZZ
@given(content=jsonl_file({"prompt": MESSAGE_LIKE, "completion": LABEL_LIKE}, ("id", "group", "label", "attrs", "sex")))
def test_prompt_completion_lines_parse_or_name_file_and_line(scratch, content):
    check_reader(read_prompt_completion_jsonl, scratch / "cases.jsonl", content)


@FUZZ
@given(content=jsonl_file({"text": MESSAGE_LIKE, "label": LABEL_LIKE}, ("id", "note")))
def test_jsonl_table_lines_parse_or_name_file_and_line(scratch, content):
    check_reader(table_reader("jsonl"), scratch / "table.jsonl", content)


@FUZZ
@given(content=CSV_FILE)
def test_csv_table_lines_parse_or_name_file_and_line(scratch, content):
    check_reader(table_reader("csv"), scratch / "table.csv", content, csv_module=True)


@pytest.mark.parametrize(
    "read", [read_prompt_completion_jsonl, table_reader("jsonl")], ids=["prompt_completion", "table"]
)
def test_deeply_nested_json_names_file_and_line(scratch, read):
    """json.loads recurses once per bracket: a line of 100,000 of them must still be a DataError."""
    content = b'{"prompt": "chest pain", "completion": "ED", "text": "chest pain", "label": "ED"}\n'
    check_reader(read, scratch / "nested.jsonl", content + b"[" * 100_000 + b"]" * 100_000)
