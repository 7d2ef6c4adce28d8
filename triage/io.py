"""Atomic writes of files and whole directories, and JSONL reading: a killed stage never leaves half an output."""

from __future__ import annotations

import csv
import ctypes
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from triage.schema import DataError


def remove_stale(directory: Path, pattern: str) -> None:
    """Delete temp files or directories a killed earlier attempt left behind (no handler runs on SIGKILL)."""
    for leftover in directory.glob(pattern):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write to; it replaces ``path`` in one rename when the block succeeds.

    Readers see the old file or the new one, never a part; on failure ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.*.tmp{path.suffix}")
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes owner-only files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_csv(path: str | Path, rows: Iterable[dict], fields: Sequence[str]) -> None:
    """``fields`` of each row as CSV with a header line, written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, value)`` for each non-blank line.

    A line that is not UTF-8 JSON is a DataError naming it.
    """
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    path,
                    number,
                    None,
                    f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte offset "
                    f"{offset + exc.start} of the file); save it as UTF-8",
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, None, f"invalid JSON at column {exc.colno}: {exc.msg}") from None


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield a temp directory beside ``final`` that replaces it only on success (see :func:`replace_directory`).

    A killed or failed stage then leaves no half-written output for DVC to cache,
    and the previous output stays whole until the new one is.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, f".{final.name}.*")
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield work / "out"
        _shared_permissions(work / "out")
        replace_directory(work / "out", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def replace_directory(new: Path, final: Path) -> None:
    """Move directory ``new`` to ``final``, which at every moment holds the old or the new whole directory.

    A rename cannot replace a non-empty directory, so the two are swapped in one
    atomic exchange (Linux ``renameat2``, macOS ``renamex_np``) and the old one,
    now at ``new``, is deleted. Only on a file system without an exchange is the
    old one moved aside first: ``final`` is then missing for the one rename in
    between, and is moved back if that rename fails.
    """
    if not final.exists():
        os.replace(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new)
        return
    aside = new.with_name(new.name + ".previous")
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False when this OS or file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        done = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    elif hasattr(libc, "renamex_np"):
        rename_swap = 2
        done = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_swap) == 0
    else:
        return False
    if not done and ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")
    return done


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _shared_permissions(directory: Path) -> None:
    """The permissions an ordinary mkdir/open would give (mkdtemp and some writers make owner-only entries)."""
    mask = _umask()
    directory.chmod(0o777 & ~mask)
    for entry in directory.rglob("*"):
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)
