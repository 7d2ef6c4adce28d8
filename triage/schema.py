"""The data contract every stage shares: labels, one example, and input errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

LABELS: tuple[str, ...] = ("ED", "GP", "HOME")
"""Triage classes from most to least urgent; the order is used everywhere."""
SPLITS: tuple[str, ...] = ("train", "valid", "test")
"""The prepared splits, in the order the stages write and read them."""

INSTRUCTION = (
    "You are a triage nurse. Read the patient's message and decide where they "
    "should go: ED (emergency department now), GP (see a doctor soon) or HOME "
    "(self-care). Answer with the label first."
)


@dataclass(frozen=True)
class Example:
    """One triage case as written to the prepared JSONL splits.

    ``prompt`` is the full user turn (instruction plus the patient's message);
    ``completion`` starts with the label and may add a one-line reason.
    ``group`` ties together cases that must stay in the same split (e.g. one
    presentation rendered several ways). ``attrs`` holds optional subgroup
    attributes such as ``age_band`` and ``sex``.
    """

    id: str
    prompt: str
    completion: str
    label: str
    group: str = ""
    attrs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class DataError(ValueError):
    """Bad input data: names the file, the line (1-based) and the field."""

    def __init__(self, path: str | Path, line: int | None, field_name: str | None, message: str):
        self.path, self.line, self.field_name = str(path), line, field_name
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field_name}':" if field_name else ""
        super().__init__(f"{where}:{what} {message}")


def render_prompt(message: str) -> str:
    """The user turn the model sees for a patient message."""
    return f"{INSTRUCTION}\n\nPatient message: {message.strip()}"


def label_of(completion: str) -> str | None:
    """The label a completion starts with, or None when it starts with none."""
    head = completion.strip().split(maxsplit=1)
    word = head[0].rstrip(".:,;-") if head else ""
    return word if word in LABELS else None


def read_examples(path: str | Path) -> list[Example]:
    """A prepared split written by the prepare stage (one Example per JSON line)."""
    import json

    with open(path, encoding="utf-8") as handle:
        return [Example(**json.loads(line)) for line in handle if line.strip()]
