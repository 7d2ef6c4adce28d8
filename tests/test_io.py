"""One atomic-write helper for files and directories: an output is at every moment the old one or the new one."""

from __future__ import annotations

import os
import stat

import pytest

from triage import io


def tree(path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def make(path, files: dict[str, str]):
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def test_a_staged_directory_replaces_a_full_one_and_leaves_nothing_beside_it(tmp_path):
    final = make(tmp_path / "out", {"a.txt": "old", "sub/b.txt": "old"})
    with io.staged_directory(final) as staged:
        make(staged, {"c.txt": "new"})
    assert tree(final) == {"c.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    mode = stat.S_IMODE(final.stat().st_mode)
    assert mode == 0o777 & ~io._umask() and stat.S_IMODE((final / "c.txt").stat().st_mode) == 0o666 & ~io._umask()


def test_a_failed_block_leaves_the_old_directory_whole(tmp_path):
    final = make(tmp_path / "out", {"a.txt": "old"})
    with pytest.raises(RuntimeError), io.staged_directory(final) as staged:
        make(staged, {"a.txt": "half"})
        raise RuntimeError("killed")
    assert tree(final) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_directories_swap_in_one_exchange_where_the_os_has_one(tmp_path):
    a, b = make(tmp_path / "a", {"x": "a"}), make(tmp_path / "b", {"y": "b"})
    if not io._exchange(a, b):
        pytest.skip("this OS or file system has no atomic exchange")
    assert tree(a) == {"y": "b"} and tree(b) == {"x": "a"}


def test_the_replacement_never_renames_onto_a_missing_path_when_it_can_exchange(tmp_path, monkeypatch):
    final = make(tmp_path / "out", {"a.txt": "old"})
    new = make(tmp_path / "new", {"b.txt": "new"})
    (tmp_path / "p").mkdir(), (tmp_path / "q").mkdir()
    if not io._exchange(tmp_path / "p", tmp_path / "q"):
        pytest.skip("this OS or file system has no atomic exchange")
    seen_missing = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (seen_missing.append(not final.exists()), real_replace(src, dst))
    )
    io.replace_directory(new, final)
    assert tree(final) == {"b.txt": "new"} and not new.exists() and seen_missing == []


def test_without_an_exchange_a_failed_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    final = make(tmp_path / "out", {"a.txt": "old"})
    new = make(tmp_path / "new", {"b.txt": "new"})
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def failing_second_rename(src, dst):
        if str(src) == str(new):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="disk full"):
        io.replace_directory(new, final)
    assert tree(final) == {"a.txt": "old"}


def test_an_atomic_file_is_the_old_or_the_new_never_a_part(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), io.atomic_file(path) as tmp:
        tmp.write_text("ha")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    io.atomic_write_text(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~io._umask()
