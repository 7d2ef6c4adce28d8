"""Importers: every format's happy path, every bad input, and the real KTAS data."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from triage.data.importers import (
    check_class_coverage,
    read_chat_jsonl,
    read_prompt_completion_jsonl,
    read_prompt_completion_splits,
    read_table,
)
from triage.data.ktas import KTAS_OUTCOME_COLUMNS, KTAS_TEXT_COLUMNS, NURSE_COLUMN, read_ktas_csv
from triage.schema import INSTRUCTION, DataError, Example, render_prompt

KTAS_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ktas" / "data.csv"


def write(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))
    return path


def pc(prompt: str = "I cut my finger", completion: str = "HOME - small cut", **extra) -> str:
    return json.dumps({"prompt": prompt, "completion": completion, **extra}, ensure_ascii=False)


def raises(call, *args, line: int | None, field: str | None, **kwargs) -> DataError:
    """Run ``call`` expecting a DataError at ``line``/``field`` whose message names both and the file."""
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    error = caught.value
    assert (error.line, error.field_name) == (line, field), str(error)
    message = str(error)
    assert message.startswith(error.path)
    if line is not None:
        assert f":{line}:" in message
    if field is not None:
        assert f"'{field}'" in message
    return error


# --------------------------------------------------------------------------- #
# Prompt/completion JSONL
# --------------------------------------------------------------------------- #


def test_prompt_completion_keeps_prompt_and_completion_verbatim(tmp_path: Path) -> None:
    path = write(
        tmp_path / "cases.jsonl",
        [
            pc("  Crushing chest pain\n", "ED. Possible heart attack.", id="c1", age_band="elderly", score=0.3),
            "",
            pc("Sore throat 2 days", "GP", group="g7", attrs={"sex": "female", "n": 3}),
        ],
    )
    first, second = read_prompt_completion_jsonl(path)
    assert first == Example(
        "c1", "  Crushing chest pain\n", "ED. Possible heart attack.", "ED", "c1", {"age_band": "elderly"}
    )
    # No id: the default names the file and the physical line (the blank line 2 counts).
    assert (second.id, second.group, second.label, second.attrs) == ("cases-3", "g7", "GP", {"sex": "female"})


def test_whitespace_before_the_label_is_removed_with_one_note(tmp_path: Path, capsys) -> None:
    path = write(
        tmp_path / "openai.jsonl",
        [pc(completion=" ED - call an ambulance"), pc(completion="\nGP"), pc(completion="HOME - rest")],
    )
    examples = read_prompt_completion_jsonl(path)
    assert [e.completion for e in examples] == ["ED - call an ambulance", "GP", "HOME - rest"]
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[import]")]
    assert len(notes) == 1 and f"{path}: 2 of 3 completions" in notes[0]
    chats = write(tmp_path / "chat.jsonl", [chat(("user", "chest pain"), ("assistant", " ED now"))])
    assert read_chat_jsonl(chats)[0].completion == "ED now"
    assert "1 of 1 completions" in capsys.readouterr().out
    read_prompt_completion_jsonl(write(tmp_path / "clean.jsonl", [pc()]))
    assert capsys.readouterr().out == ""  # nothing changed, nothing said


def test_prompt_completion_accepts_integer_ids_and_a_matching_label(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [pc(id=7, label="HOME")])
    assert read_prompt_completion_jsonl(path)[0].id == "7"


def test_invalid_json_names_its_physical_line(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [pc(), "", '{"prompt": "x", "completion": ED}'])
    error = raises(read_prompt_completion_jsonl, path, line=3, field=None)
    assert "invalid JSON" in str(error) and str(path) in str(error)


@pytest.mark.parametrize("line", ['["ED", "chest pain"]', '"chest pain"', "42"])
def test_a_line_that_is_not_an_object_is_rejected(tmp_path: Path, line: str) -> None:
    error = raises(read_prompt_completion_jsonl, write(tmp_path / "t.jsonl", [pc(), line]), line=2, field=None)
    assert "expected a JSON object" in str(error)


@pytest.mark.parametrize("field", ["prompt", "completion"])
def test_missing_field(tmp_path: Path, field: str) -> None:
    record = json.loads(pc())
    del record[field]
    path = write(tmp_path / "t.jsonl", [pc(), json.dumps(record)])
    assert "missing" in str(raises(read_prompt_completion_jsonl, path, line=2, field=field))


@pytest.mark.parametrize("field", ["prompt", "completion"])
@pytest.mark.parametrize("value", ["", "  \n\t "])
def test_empty_or_blank_text(tmp_path: Path, field: str, value: str) -> None:
    path = write(tmp_path / "t.jsonl", [pc(**{"prompt": "x", "completion": "GP", field: value})])
    assert "empty" in str(raises(read_prompt_completion_jsonl, path, line=1, field=field))


def test_text_must_be_a_string(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [pc(prompt=123)])
    assert "a number" in str(raises(read_prompt_completion_jsonl, path, line=1, field="prompt"))


def test_unknown_label_lists_the_allowed_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [pc(), pc(completion="URGENT: go to A&E")])
    error = raises(read_prompt_completion_jsonl, path, line=2, field="completion")
    assert "ED, GP, HOME" in str(error) and "'URGENT:'" in str(error)


def test_label_field_must_agree_with_the_completion(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [pc(completion="GP soon", label="ED")])
    assert "'GP'" in str(raises(read_prompt_completion_jsonl, path, line=1, field="label"))


def test_invalid_utf8_names_line_and_field_and_suggests_the_encoding_option(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [pc(), pc(prompt="Fièvre et toux", completion="GP")], encoding="cp1252")
    error = raises(read_prompt_completion_jsonl, path, line=2, field="prompt")
    assert "0xE8" in str(error) and "encoding=" in str(error)
    assert read_prompt_completion_jsonl(path, encoding="cp1252")[1].prompt == "Fièvre et toux"


def test_invalid_byte_outside_a_string_is_reported_as_an_encoding_error(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(pc().encode() + b"\n\xff" + pc().encode() + b"\n")
    assert "not valid utf-8" in str(raises(read_prompt_completion_jsonl, path, line=2, field=None))


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [pc(id="a"), pc(id="b"), pc(id="a")])
    assert "first on line 1" in str(raises(read_prompt_completion_jsonl, path, line=3, field="id"))


@pytest.mark.parametrize("content", [[], ["", "   "]])
def test_empty_file(tmp_path: Path, content: list[str]) -> None:
    error = raises(read_prompt_completion_jsonl, write(tmp_path / "t.jsonl", content), line=None, field=None)
    assert "empty" in str(error)


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in str(raises(read_prompt_completion_jsonl, tmp_path / "nope.jsonl", line=None, field=None))


def test_no_reader_writes_files(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [pc(), "{bad"])
    with pytest.raises(DataError):
        read_prompt_completion_jsonl(path)
    read_prompt_completion_jsonl(write(path, [pc()]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


# --------------------------------------------------------------------------- #
# Split directories and class coverage
# --------------------------------------------------------------------------- #


def all_classes(prefix: str) -> list[str]:
    return [pc(completion=label, id=f"{prefix}{i}") for i, label in enumerate(["ED", "GP", "HOME"])]


def write_splits(directory: Path, **overrides: list[str]) -> Path:
    for name in ("train", "valid", "test"):
        write(directory / f"{name}.jsonl", overrides.get(name, all_classes(name)))
    return directory


def test_splits_are_read_by_name(tmp_path: Path) -> None:
    splits = read_prompt_completion_splits(write_splits(tmp_path))
    assert {name: [e.id for e in examples] for name, examples in splits.items()} == {
        name: [f"{name}0", f"{name}1", f"{name}2"] for name in ("train", "valid", "test")
    }


def test_missing_split_file(tmp_path: Path) -> None:
    write_splits(tmp_path)
    (tmp_path / "valid.jsonl").unlink()
    error = raises(read_prompt_completion_splits, tmp_path, line=None, field=None)
    assert error.path == str(tmp_path / "valid.jsonl")


def test_split_without_a_class_names_split_and_class(tmp_path: Path) -> None:
    write_splits(tmp_path, test=all_classes("test")[:2])
    error = raises(read_prompt_completion_splits, tmp_path, line=None, field="label")
    assert "'test'" in str(error) and "HOME" in str(error)


def test_check_class_coverage_names_every_missing_class() -> None:
    ed = Example("a", "p", "ED", "ED")
    full = [ed, Example("b", "p", "GP", "GP"), Example("c", "p", "HOME", "HOME")]
    check_class_coverage({"train": full, "valid": full}, "src")
    error = raises(check_class_coverage, {"train": full, "valid": [ed]}, "src", line=None, field="label")
    assert "'valid'" in str(error) and "GP or HOME" in str(error) and error.path == "src"
    assert "'test'" in str(raises(check_class_coverage, {"test": []}, "src", line=None, field="label"))


@pytest.mark.parametrize("field", ["id", "group"])
def test_an_id_or_group_in_two_splits_is_leakage(tmp_path: Path, field: str) -> None:
    test = all_classes("test")
    test[1] = pc(completion="GP", id="test1", group="shared") if field == "group" else pc(completion="GP", id="train0")
    train = all_classes("train")
    train[0] = pc(completion="ED", id="train0", group="shared") if field == "group" else train[0]
    write_splits(tmp_path, train=train, test=test)
    error = raises(read_prompt_completion_splits, tmp_path, line=2, field=field)
    assert error.path.endswith("test.jsonl") and "train.jsonl" in str(error)


# --------------------------------------------------------------------------- #
# Chat JSONL
# --------------------------------------------------------------------------- #


def chat(*turns: tuple[str, str], **extra) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns], **extra})


def test_chat_uses_user_turns_as_the_message_and_the_last_answer_as_completion(tmp_path: Path) -> None:
    path = write(
        tmp_path / "chat.jsonl",
        [
            chat(("system", "Be brief."), ("user", "My chest hurts"), ("assistant", "ED now"), id="x", sex="male"),
            chat(
                ("user", "I have a rash"),
                ("assistant", "Is it spreading?"),
                ("user", "No, 3 days"),
                ("assistant", "GP: book an appointment"),
            ),
        ],
    )
    first, second = read_chat_jsonl(path)
    assert first == Example("x", render_prompt("My chest hurts"), "ED now", "ED", "x", {"sex": "male"})
    assert second.prompt == render_prompt("I have a rash\nNo, 3 days")
    assert (second.id, second.completion, second.label) == ("chat-2", "GP: book an appointment", "GP")
    assert "Be brief" not in first.prompt and "spreading" not in second.prompt


@pytest.mark.parametrize(
    ("record", "field", "words"),
    [
        ({"id": 1}, "messages", "missing"),
        ({"messages": "hi"}, "messages", "non-empty array"),
        ({"messages": []}, "messages", "non-empty array"),
        ({"messages": ["hi"]}, "messages[0]", "object"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role", "missing"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unknown role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
        ({"messages": [{"role": "user", "content": " "}]}, "messages[0].content", "empty"),
        ({"messages": [{"role": "assistant", "content": "ED"}, {"role": "user", "content": "hi"}]}, "messages", "end"),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "ED"}]},
            "messages",
            "no user message",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "maybe"}]},
            "messages[1].content",
            "ED, GP, HOME",
        ),
    ],
)
def test_bad_chat_records(tmp_path: Path, record: dict, field: str, words: str) -> None:
    path = write(tmp_path / "chat.jsonl", [chat(("user", "ok"), ("assistant", "HOME")), json.dumps(record)])
    assert words in str(raises(read_chat_jsonl, path, line=2, field=field))


def test_chat_duplicate_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "chat.jsonl", [chat(("user", "a"), ("assistant", "ED"), id="1")] * 2)
    raises(read_chat_jsonl, path, line=2, field="id")


# --------------------------------------------------------------------------- #
# Generic tables
# --------------------------------------------------------------------------- #

LEVELS = {"Emergent": "ED", "urgent": "GP", "NON-URGENT": "HOME"}


def test_csv_table_with_mapping_ids_attrs_and_a_multiline_cell(tmp_path: Path) -> None:
    path = write(
        tmp_path / "msgs.csv",
        [
            "case,message,acuity,sex,age_band",
            'a1,"Fell off a ladder,\nleg bent wrong",EMERGENT,male,adult',
            "a2,Mild headache,non-urgent,female,",
            "a3,Cough for a week,GP,,elderly",
        ],
    )
    examples = read_table(path, "csv", "message", "acuity", LEVELS, id_field="case", attr_fields=("sex", "age_band"))
    assert [(e.id, e.label, e.completion, e.group, e.attrs) for e in examples] == [
        ("a1", "ED", "ED", "a1", {"sex": "male", "age_band": "adult"}),
        ("a2", "HOME", "HOME", "a2", {"sex": "female"}),
        ("a3", "GP", "GP", "a3", {"age_band": "elderly"}),
    ]
    assert examples[0].prompt == render_prompt("Fell off a ladder,\nleg bent wrong")


def test_csv_errors_name_the_physical_line_after_a_multiline_cell(tmp_path: Path) -> None:
    path = write(tmp_path / "msgs.csv", ["text,label", '"two\nlines",ED', "", "third,SOON"])
    error = raises(read_table, path, "csv", "text", "label", LEVELS, line=5, field="label")
    assert "'SOON'" in str(error) and "ED, GP, HOME" in str(error) and "'emergent' -> ED" in str(error)


def test_unknown_label_without_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", ["text,label", "x,ed", "y,3"])
    assert "none given" in str(raises(read_table, path, "csv", "text", "label", line=3, field="label"))


def test_jsonl_table_maps_numeric_labels_and_uses_a_group_field(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.jsonl",
        [
            json.dumps({"msg": "Cannot breathe", "level": 1, "visit": "v1", "age": 80}),
            json.dumps({"msg": "Itchy eyes", "level": 5, "visit": "v1"}),
        ],
    )
    examples = read_table(
        path, "jsonl", "msg", "level", {"1": "ED", "5": "HOME"}, attr_fields=("age",), group_field="visit"
    )
    assert [(e.id, e.label, e.group, e.attrs) for e in examples] == [
        ("t-1", "ED", "v1", {"age": "80"}),
        ("t-2", "HOME", "v1", {}),
    ]


def test_csv_missing_column_is_reported_on_the_header_line(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", ["", "text,label", "x,ED"])
    error = raises(read_table, path, "csv", "text", "label", attr_fields=("sex",), line=2, field="sex")
    assert "text, label" in str(error)


def test_jsonl_table_missing_field(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [json.dumps({"text": "x", "label": "ED"}), json.dumps({"text": "y"})])
    assert "missing" in str(raises(read_table, path, "jsonl", "text", "label", line=2, field="label"))


def test_empty_text_cell(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", ["text,label", "x,ED", "  ,GP"])
    assert "empty" in str(raises(read_table, path, "csv", "text", "label", line=3, field="text"))


def test_csv_in_another_encoding(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", ["text,label", "fine,ED", "Douleur à la poitrine,ED"], encoding="cp1252")
    error = raises(read_table, path, "csv", "text", "label", line=3, field="text")
    assert "encoding=" in str(error)
    assert read_table(path, "csv", "text", "label", encoding="cp1252")[1].prompt.endswith("à la poitrine")


def test_table_duplicate_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", ["id,text,label", "1,x,ED", "2,y,GP", "1,z,HOME"])
    raises(read_table, path, "csv", "text", "label", id_field="id", line=4, field="id")


@pytest.mark.parametrize(("lines", "words"), [([], "empty"), (["text,label"], "no data rows")])
def test_empty_csv(tmp_path: Path, lines: list[str], words: str) -> None:
    path = write(tmp_path / "t.csv", lines)
    assert words in str(raises(read_table, path, "csv", "text", "label", line=None, field=None))


def test_csv_row_with_the_wrong_number_of_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", ["text,label", "x,ED", "chest pain, left arm,ED"])
    assert "3 fields" in str(raises(read_table, path, "csv", "text", "label", line=3, field=None))


@pytest.mark.parametrize("label_map", [{"emergent": "URGENT"}, {"Emergent": "ED", "EMERGENT": "GP"}])
def test_bad_label_map(tmp_path: Path, label_map: dict[str, str]) -> None:
    path = write(tmp_path / "t.csv", ["text,label", "x,ED"])
    raises(read_table, path, "csv", "text", "label", label_map, line=None, field="label_map")


def test_unknown_table_format(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", ["text,label", "x,ED"])
    raises(read_table, path, "xlsx", "text", "label", line=None, field="fmt")


# --------------------------------------------------------------------------- #
# KTAS: a small file in the KTAS layout (made-up visits), then the real data
# --------------------------------------------------------------------------- #

KTAS_HEADER = [
    "Group",
    "Sex",
    "Age",
    "Patients number per hour",
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
    "KTAS_RN",
    "Diagnosis in ED",
    "Disposition",
    "KTAS_expert",
    "Error_group",
    "Length of stay_min",
    "KTAS duration_min",
    "mistriage",
]
VISIT = {
    "Group": "2",
    "Sex": "1",
    "Age": "62",
    "Patients number per hour": "7",
    "Arrival mode": "2",
    "Injury": "1",
    "Chief_complain": "chest pain",
    "Mental": "1",
    "Pain": "1",
    "NRS_pain": "6",
    "SBP": "150",
    "DBP": "90",
    "HR": "96",
    "RR": "20",
    "BT": "36.8",
    "Saturation": "97",
    "KTAS_RN": "3",
    "Diagnosis in ED": "Angina",
    "Disposition": "2",
    "KTAS_expert": "2",
    "Error_group": "0 ",
    "Length of stay_min": "300",
    "KTAS duration_min": "4,50",
    "mistriage": "0 ",
}


def write_ktas(path: Path, *visits: dict[str, str]) -> Path:
    rows = [";".join(KTAS_HEADER)] + [
        ";".join({**VISIT, **visit}[column] for column in KTAS_HEADER) for visit in visits
    ]
    return write(path, rows, encoding="cp1254")


def note(example: Example) -> str:
    return example.prompt.split("Patient message: ", 1)[1]


def test_ktas_note_reads_like_a_triage_note(tmp_path: Path) -> None:
    [example] = read_ktas_csv(write_ktas(tmp_path / "k.csv", {}))
    assert example.prompt.startswith(INSTRUCTION)
    assert note(example) == (
        "62-year-old woman, arrived by public ambulance. Complaint: chest pain. Alert. Pain 6/10. "
        "BP 150/90, pulse 96, breathing 20/min, temp 36.8 °C, SpO2 97%."
    )
    assert example == Example(
        "ktas-1",
        example.prompt,
        "ED",
        "ED",
        "ktas-1",
        {"age_band": "adult", "sex": "female", "vitals": "normal", "nurse_label": "ED"},
    )


def test_ktas_missing_values_are_left_out(tmp_path: Path) -> None:
    visits = [
        {"Chief_complain": "?? ???", "NRS_pain": "#BOŞ!", "SBP": "??", "DBP": "??", "Saturation": "", "BT": "36,8"},
        {
            "Sex": "2",
            "Age": "16",
            "Arrival mode": "1",
            "Injury": "2",
            "Chief_complain": "Pain, ?nus",
            "Mental": "3",
            "Pain": "0",
            "NRS_pain": "#BOŞ!",
            "DBP": "??",
            "HR": "??",
            "RR": "??",
            "BT": "??",
            "Saturation": "??",
            "KTAS_expert": "4",
        },
        {"KTAS_expert": "5"},
    ]
    first, second, third = read_ktas_csv(write_ktas(tmp_path / "k.csv", *visits))
    assert note(first) == (
        "62-year-old woman, arrived by public ambulance. Alert. In pain, score not recorded. "
        "Pulse 96, breathing 20/min, temp 36.8 °C."
    )
    assert note(second) == (
        "16-year-old boy, walked in. Complaint: Pain. Injury-related visit. Responds to pain only. No pain. "
        "Systolic BP 150."
    )
    assert second.attrs == {"age_band": "child", "sex": "male", "vitals": "missing", "nurse_label": "ED"}
    assert [e.label for e in (first, second, third)] == ["ED", "GP", "HOME"]


@pytest.mark.parametrize(("nurse", "expected"), [("1", "ED"), ("2", "ED"), ("3", "ED"), ("4", "GP"), ("5", "HOME")])
def test_ktas_nurse_level_is_an_attribute_mapped_like_the_label(tmp_path: Path, nurse: str, expected: str) -> None:
    examples = read_ktas_csv(write_ktas(tmp_path / "k.csv", {"KTAS_RN": nurse, "KTAS_expert": nurse}))
    [baseline] = read_ktas_csv(write_ktas(tmp_path / "base.csv", {"KTAS_expert": nurse}))
    assert [(e.label, e.attrs["nurse_label"]) for e in examples] == [(expected, expected)]
    # The nurse's level changes nothing a model sees.
    assert examples[0].prompt == baseline.prompt


def test_ktas_nurse_level_missing_or_absent_gives_no_attribute(tmp_path: Path) -> None:
    recorded, missing = read_ktas_csv(write_ktas(tmp_path / "k.csv", {"KTAS_RN": "5"}, {"KTAS_RN": "#BOŞ!"}))
    assert recorded.attrs["nurse_label"] == "HOME" and "nurse_label" not in missing.attrs
    header = [column for column in KTAS_HEADER if column != NURSE_COLUMN]
    rows = [";".join(header), ";".join(VISIT[column] for column in header)]
    [without] = read_ktas_csv(write(tmp_path / "no_rn.csv", rows, encoding="cp1254"))
    assert "nurse_label" not in without.attrs and without.prompt == recorded.prompt


def test_ktas_unknown_nurse_level_names_line_and_column(tmp_path: Path) -> None:
    raises(read_ktas_csv, write_ktas(tmp_path / "k.csv", {}, {"KTAS_RN": "7"}), line=3, field=NURSE_COLUMN)


@pytest.mark.parametrize(
    ("visit", "expected"),
    [
        ({}, "normal"),
        ({"SBP": "89"}, "abnormal"),
        ({"SBP": "90"}, "normal"),
        ({"SBP": "180"}, "normal"),
        ({"SBP": "181"}, "abnormal"),
        ({"DBP": "120"}, "normal"),
        ({"DBP": "121"}, "abnormal"),
        ({"HR": "49"}, "abnormal"),
        ({"HR": "50"}, "normal"),
        ({"HR": "120"}, "normal"),
        ({"HR": "121"}, "abnormal"),
        ({"RR": "9"}, "abnormal"),
        ({"RR": "10"}, "normal"),
        ({"RR": "24"}, "normal"),
        ({"RR": "25"}, "abnormal"),
        ({"BT": "35,9"}, "abnormal"),
        ({"BT": "36.0"}, "normal"),
        ({"BT": "38.4"}, "normal"),
        ({"BT": "38.5"}, "abnormal"),
        ({"Saturation": "91"}, "abnormal"),
        ({"Saturation": "92"}, "normal"),
        ({"Saturation": "??"}, "normal"),
        ({"DBP": "??"}, "normal"),
        ({"SBP": "??"}, "missing"),
        ({"HR": "??"}, "missing"),
        ({"RR": "#BOŞ!"}, "missing"),
        ({"BT": ""}, "missing"),
        ({"SBP": "??", "HR": "130"}, "abnormal"),
    ],
)
def test_ktas_vitals_attribute_follows_the_adult_limits(tmp_path: Path, visit: dict[str, str], expected: str) -> None:
    [example] = read_ktas_csv(write_ktas(tmp_path / "k.csv", visit))
    assert example.attrs["vitals"] == expected


def test_ktas_identical_notes_share_a_group(tmp_path: Path) -> None:
    examples = read_ktas_csv(write_ktas(tmp_path / "k.csv", {}, {"Age": "30"}, {}))
    assert [e.group for e in examples] == ["ktas-1", "ktas-2", "ktas-1"]


@pytest.mark.parametrize(
    ("visit", "field"),
    [
        ({"KTAS_expert": "??"}, "KTAS_expert"),
        ({"KTAS_expert": "6"}, "KTAS_expert"),
        ({"Sex": "3"}, "Sex"),
        ({"HR": "fast"}, "HR"),
        ({"NRS_pain": "11"}, "NRS_pain"),
    ],
)
def test_ktas_bad_cells_name_line_and_column(tmp_path: Path, visit: dict[str, str], field: str) -> None:
    raises(read_ktas_csv, write_ktas(tmp_path / "k.csv", {}, visit), line=3, field=field)


def test_ktas_file_without_a_needed_column(tmp_path: Path) -> None:
    path = write(tmp_path / "k.csv", ["Sex;Age;KTAS_expert", "1;40;3"])
    raises(read_ktas_csv, path, line=1, field="Arrival mode")


@pytest.fixture(scope="module")
def ktas_rows() -> list[dict[str, str]]:
    if not KTAS_DATA.is_file():
        pytest.skip(f"KTAS data not found at {KTAS_DATA}")
    with KTAS_DATA.open(encoding="cp1254", newline="") as handle:
        return list(csv.DictReader(handle, delimiter=";"))


@pytest.fixture(scope="module")
def ktas_examples(ktas_rows: list[dict[str, str]]) -> list[Example]:
    return read_ktas_csv(KTAS_DATA)


def test_ktas_imports_every_visit(ktas_examples: list[Example]) -> None:
    assert len(ktas_examples) == 1267
    assert [e.id for e in ktas_examples] == [f"ktas-{n}" for n in range(1, 1268)]


def test_ktas_labels_follow_the_expert_level(ktas_examples: list[Example]) -> None:
    import pandas as pd

    frame = pd.read_csv(KTAS_DATA, sep=";", encoding="cp1254")
    expected = frame["KTAS_expert"].map({1: "ED", 2: "ED", 3: "ED", 4: "GP", 5: "HOME"})
    assert [e.label for e in ktas_examples] == expected.tolist()
    assert Counter(e.label for e in ktas_examples) == {"ED": 733, "GP": 459, "HOME": 75}
    bands = pd.cut(frame["Age"], [0, 17, 64, 200], labels=["child", "adult", "elderly"]).astype(str)
    assert [e.attrs["age_band"] for e in ktas_examples] == bands.tolist()


def test_ktas_text_never_shows_missing_markers(ktas_examples: list[Example]) -> None:
    for example in ktas_examples:
        text = note(example)
        assert not any(marker in text for marker in ("?", "#BO", "nan", "None", " .", ",,")), (example.id, text)


def test_ktas_outcome_columns_cannot_leak_into_the_text(
    tmp_path: Path, ktas_rows: list[dict[str, str]], ktas_examples: list[Example]
) -> None:
    def rewrite(columns: tuple[str, ...]) -> list[Example]:
        path = tmp_path / "scrambled.csv"
        with path.open("w", encoding="cp1254", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(ktas_rows[0]), delimiter=";")
            writer.writeheader()
            for number, row in enumerate(ktas_rows):
                writer.writerow({**row, **{column: f"LEAK{number}" for column in columns}})
        return read_ktas_csv(path)

    hidden = tuple(column for column in ktas_rows[0] if column not in (*KTAS_TEXT_COLUMNS, "KTAS_expert"))
    assert set(KTAS_OUTCOME_COLUMNS) <= set(hidden)
    # The nurse's level is read (into attrs), so it is scrambled within its codes, the rest into text.
    scrambled = rewrite(tuple(column for column in hidden if column != NURSE_COLUMN))
    assert [(e.prompt, e.label) for e in scrambled] == [(e.prompt, e.label) for e in ktas_examples]
    # The same scrambling of an input column does reach the text, so the check above can fail.
    assert any("LEAK" in e.prompt for e in rewrite(("Chief_complain",)))


def test_ktas_nurse_label_is_the_nurses_level_mapped_like_the_expert(ktas_examples: list[Example]) -> None:
    import pandas as pd

    frame = pd.read_csv(KTAS_DATA, sep=";", encoding="cp1254")
    mapping = {1: "ED", 2: "ED", 3: "ED", 4: "GP", 5: "HOME"}
    nurses = frame[NURSE_COLUMN].map(mapping)
    assert [e.attrs["nurse_label"] for e in ktas_examples] == nurses.tolist()
    # The human reference quoted in the docs (DESIGN.md section 9): agreement 0.898, ED recall 0.894.
    agree = sum(e.attrs["nurse_label"] == e.label for e in ktas_examples) / len(ktas_examples)
    ed = [e for e in ktas_examples if e.label == "ED"]
    assert round(agree, 3) == 0.898 and round(sum(e.attrs["nurse_label"] == "ED" for e in ed) / len(ed), 3) == 0.894


def test_ktas_prompt_never_carries_the_nurses_level(
    tmp_path: Path, ktas_rows: list[dict[str, str]], ktas_examples: list[Example]
) -> None:
    """Every visit's nurse level moved to another level: the prompts stay byte for byte, the attribute follows."""
    path = tmp_path / "rotated.csv"
    with path.open("w", encoding="cp1254", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ktas_rows[0]), delimiter=";")
        writer.writeheader()
        for row in ktas_rows:
            writer.writerow({**row, NURSE_COLUMN: str(int(row[NURSE_COLUMN]) % 5 + 1)})
    rotated = read_ktas_csv(path)
    assert [e.prompt for e in rotated] == [e.prompt for e in ktas_examples]
    assert [e.attrs["nurse_label"] for e in rotated] != [e.attrs["nurse_label"] for e in ktas_examples]
    for example in ktas_examples:
        assert not any(word in example.prompt for word in ("KTAS", "nurse_label", "level")), example.id


def test_ktas_vitals_attribute_on_the_real_data(ktas_examples: list[Example]) -> None:
    import pandas as pd

    frame = pd.read_csv(KTAS_DATA, sep=";", encoding="cp1254", dtype=str)
    vital = {
        column: pd.to_numeric(frame[column].str.strip().str.replace(",", "."), errors="coerce")
        for column in ("SBP", "DBP", "HR", "RR", "BT", "Saturation")
    }
    abnormal = (
        (vital["SBP"] < 90)
        | (vital["SBP"] > 180)
        | (vital["DBP"] > 120)
        | (vital["HR"] < 50)
        | (vital["HR"] > 120)
        | (vital["RR"] < 10)
        | (vital["RR"] > 24)
        | (vital["BT"] < 36)
        | (vital["BT"] >= 38.5)
        | (vital["Saturation"] < 92)
    )
    recorded = pd.concat([vital[c].notna() for c in ("SBP", "HR", "RR", "BT")], axis=1).all(axis=1)
    expected = ["abnormal" if a else "normal" if r else "missing" for a, r in zip(abnormal, recorded)]
    assert [e.attrs["vitals"] for e in ktas_examples] == expected
    assert set(expected) == {"abnormal", "normal", "missing"}
