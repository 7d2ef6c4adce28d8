"""mlx-lm's non-public names: the installed mlx-lm has them all, and only triage.model.mlx_lm_internals uses them."""

from __future__ import annotations

import ast

import pytest
from mlx_lm import cli_ui

from conftest import ROOT
from triage.model import mlx_lm_internals as internals

CODE = ("triage", "stages", "bench")


def test_the_installed_mlx_lm_has_every_internal_name_we_use():
    missing = internals.missing_names()
    assert not missing, "\n".join(missing)


def test_a_missing_name_is_reported_with_its_path_and_reason(monkeypatch):
    monkeypatch.setattr(cli_ui, "make_console", cli_ui.make_console)  # put back after the swap below
    monkeypatch.delattr(cli_ui, "_terminal_width")
    message = internals.TERMINAL_WIDTH.missing()
    assert internals.missing_names() == [message]
    assert "has no mlx_lm.cli_ui._terminal_width" in message and internals.TERMINAL_WIDTH.reason in message
    assert f"written against mlx-lm {internals.WRITTEN_AGAINST}" in message
    internals.trainer_display_only_on_a_terminal()
    with pytest.raises(internals.MlxLmChanged, match=r"has no mlx_lm\.cli_ui\._terminal_width"):
        cli_ui.make_console()


def imports_of_internals(path) -> list[str]:
    """The listed names, and the modules they live in, that ``path`` imports."""
    listed = {name.path for name in internals.NAMES} | {name.module for name in internals.NAMES}
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in listed]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name in listed]
    return found


def test_no_other_module_imports_an_internal_name_or_its_module():
    own = ROOT / "triage" / "model" / "mlx_lm_internals.py"
    found = {
        str(path.relative_to(ROOT)): names
        for folder in CODE
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != own and (names := imports_of_internals(path))
    }
    assert not found, f"use these through triage.model.mlx_lm_internals: {found}"
