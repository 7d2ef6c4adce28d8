"""`python -m triage predict` refuses bad input before it loads a model: the file, line and field, exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT, run


def predict(tmp_path: Path, *args: str):
    return run(
        [
            "python",
            "-m",
            "triage",
            "--root",
            str(tmp_path),
            "--params",
            str(ROOT / "params.yaml"),
            "predict",
            "--run",
            "any-4bit-x",
            *args,
        ],
        ROOT,
        check=False,
    )


@pytest.mark.parametrize("message", [[""], ["   "]])
def test_an_empty_message_is_refused(tmp_path, message):
    result = predict(tmp_path, *message)
    assert result.returncode == 1 and "the message is empty" in result.stderr


@pytest.mark.parametrize(
    "lines, where",
    [
        (b'{"text": "chest pain"}\n{"text": "cough"\n', "{path}:2: invalid JSON"),
        (b'{"text": "chest pain"}\n\n{"text": ""}\n', "{path}:3: field 'text'"),
        (b'{"text": "chest pain"}\n["cough"]\n', "{path}:2: field 'text'"),
        (b'{"text": "chest pain"}\n{"text": "caf\xe9"}\n', "{path}:2: not UTF-8 text (byte 0xe9 at byte offset 36 of"),
        (
            b'{"id": "a", "text": "chest pain"}\n{"id": "a", "text": "cough"}\n',
            "{path}:2: field 'id': id 'a' is already on line 1",
        ),
        (b"\n\n", "{path}: no messages"),
    ],
)
def test_a_bad_file_names_its_line(tmp_path, lines, where):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(lines)
    result = predict(tmp_path, "--file", str(path))
    assert result.returncode == 1 and where.format(path=path) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
