"""Prove, before anything loads it, that a BLAS library runs on this CPU.

The ``mlx[cpu]`` Linux wheel links the reference (netlib) BLAS, about 30x
slower than OpenBLAS for fp32 matmul. Loading an OpenBLAS with global symbols
before ``mlx.core`` is imported makes the dynamic linker bind MLX's
``cblas_sgemm`` to it. A library built for one CPU family kills the process on
any other: cmeel-openblas 0.3.31 is a SKYLAKEX-only build and dies with SIGILL
on a CPU without AVX-512 (AMD Zen 1-3, recent Intel desktop chips). So
:mod:`triage.runtime.blas` makes no library global before it has passed
:func:`prove` on this CPU: its build target against ``/proc/cpuinfo``'s
flags, and a small sgemm in a child process (:mod:`triage.runtime.sgemm_probe`)
checked against numpy. Verdicts are cached per library file and CPU in
:func:`verdict_cache_path`.

This module never imports mlx: it must run before mlx is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

CACHE_ENV = "TRIAGE_BLAS_CACHE"
"""File holding the probe verdicts (default: ``$XDG_CACHE_HOME/triage-qlora/blas-verdicts.json``,
i.e. ``~/.cache/triage-qlora/blas-verdicts.json``). Deleting it only costs one probe per library."""

PROBE = Path(__file__).with_name("sgemm_probe.py")
PROBE_TIMEOUT_S = 120.0
MAX_RELATIVE_ERROR = 1e-4  # fp32 sgemm of K <= 256 terms lands near 1e-6

SINGLE_TARGET_NEEDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "SAPPHIRERAPIDS": ("AVX-512 + AMX", ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile")),
    "COOPERLAKE": ("AVX-512 BF16", ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")),
    "SKYLAKEX": ("AVX-512", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")),
    "ZEN": ("AVX2", ("avx2", "fma")),
    "HASWELL": ("AVX2", ("avx2", "fma")),
    "SANDYBRIDGE": ("AVX", ("avx",)),
}
"""OpenBLAS's single-target x86 builds and the CPU flags their kernels need
(OpenBLAS's ``Makefile.x86_64``). A DYNAMIC_ARCH build picks a kernel at run
time and needs nothing; unknown targets are left to the sgemm probe."""


@dataclass(frozen=True)
class Cpu:
    """The running CPU as the dynamic linker's code sees it: model name and feature flags."""

    model: str
    flags: frozenset[str]

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.model}|{' '.join(sorted(self.flags))}".encode()).hexdigest()[:16]


def this_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> Cpu:
    """The first processor's ``model name`` and ``flags`` (Linux); the platform's name and no flags elsewhere."""
    fields: dict[str, str] = {}
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return Cpu(fields.get("model name", platform.processor()), frozenset(fields.get("flags", "").split()))


@dataclass(frozen=True)
class Candidate:
    """One library that may serve MLX's BLAS calls; ``path`` None when it is not on this machine."""

    label: str
    path: Path | None
    missing: str = ""


@dataclass(frozen=True)
class ProbeResult:
    """What the child process reported about one library, before any judgement."""

    config: str = ""
    core: str = ""
    max_relative_error: float | None = None
    failure: str = ""  # why the child did not finish: a signal, an error, a timeout


@dataclass(frozen=True)
class Verdict:
    candidate: Candidate
    probe: ProbeResult
    problem: str  # "" when the library may be loaded
    cached: bool

    @property
    def ok(self) -> bool:
        return not self.problem


def debian_openblas(multiarch: str | None = None) -> list[Candidate]:
    """Debian/Ubuntu's DYNAMIC_ARCH OpenBLAS packages that are installed (``libopenblas0-pthread`` first)."""
    multiarch = multiarch or sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    flavours = ("openblas-pthread", "openblas-openmp")
    return [
        Candidate(f"debian lib{flavour.replace('-', '0-', 1)}", path)
        for flavour in flavours
        if (path := Path("/usr/lib") / multiarch / flavour / "libopenblas.so.0").exists()
    ]


def ldconfig_openblas() -> Candidate:
    """The ``libopenblas.so.0`` that the dynamic linker's cache names (any distribution)."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    found = re.search(r"^\s*libopenblas\.so\.0 \(([^)]*)\) => (\S+)$", listing, re.MULTILINE)
    return Candidate(
        "system libopenblas",
        Path(found.group(2)) if found else None,
        "" if found else "no libopenblas.so.0 in the linker cache",
    )


def cmeel_openblas() -> Candidate:
    """``libopenblas.so.0`` from the PyPI package cmeel-openblas (a single-target build: it must pass the proof)."""
    try:
        dist = metadata.distribution("cmeel-openblas")
    except metadata.PackageNotFoundError:
        return Candidate("cmeel-openblas", None, "not installed")
    for name in ("libopenblas.so.0", "libopenblas.so"):
        for file in dist.files or []:
            if file.name == name and (path := Path(str(dist.locate_file(file)))).exists():
                return Candidate(f"cmeel-openblas {dist.version}", path)
    return Candidate(f"cmeel-openblas {dist.version}", None, "package has no libopenblas.so.0")


def candidates(choice: str) -> list[Candidate]:
    """The libraries ``choice`` allows, in order of preference, each real file once."""
    if "/" in choice:
        return [Candidate(choice, Path(choice))]
    found = []
    if choice in ("auto", "system"):
        found += [*debian_openblas(), ldconfig_openblas()]
    if choice in ("auto", "cmeel"):
        found.append(cmeel_openblas())
    if not found:
        raise ValueError(f"unknown BLAS choice {choice!r}: expected auto, system, cmeel, reference or a library path")
    unique: dict[object, Candidate] = {}
    for candidate in found:  # e.g. the linker cache's libopenblas.so.0 is Debian's, through a symlink
        unique.setdefault(candidate.path.resolve() if candidate.path else candidate.label, candidate)
    return list(unique.values())


def static_problem(config: str, cpu: Cpu) -> str:
    """Why an OpenBLAS build cannot run on ``cpu``, from its build description alone ("" when nothing shows)."""
    words = config.split()
    if "DYNAMIC_ARCH" in words:
        return ""
    for word in words:
        if word.upper() in SINGLE_TARGET_NEEDS:
            family, needs = SINGLE_TARGET_NEEDS[word.upper()]
            missing = [flag for flag in needs if flag not in cpu.flags]
            if missing:
                return f"built for {word} ({family}); this CPU lacks {', '.join(missing)}"
            return ""
    return ""


def run_probe(path: Path, timeout: float = PROBE_TIMEOUT_S, probe: Path = PROBE) -> ProbeResult:
    """Run :mod:`triage.runtime.sgemm_probe` on ``path`` in a child process and collect what it said."""
    try:
        done = subprocess.run([sys.executable, str(probe), str(path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeResult(failure=f"probe timed out after {timeout:.0f} s")
    said: dict = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            said.update(json.loads(line))
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        failure = f"probe died with {name}" + (" (an instruction this CPU lacks)" if name == "SIGILL" else "")
    elif done.returncode > 0:
        failure = f"probe failed: {(done.stderr.strip().splitlines() or [f'exit {done.returncode}'])[-1]}"
    else:
        failure = ""
    return ProbeResult(said.get("config", ""), said.get("core", ""), said.get("max_relative_error"), failure)


def judge(probe: ProbeResult, cpu: Cpu) -> str:
    """The reason not to load a library with this probe result on ``cpu``; "" when it passed."""
    if problem := static_problem(probe.config, cpu):
        return problem
    if probe.failure:
        return probe.failure
    if probe.max_relative_error is None or not probe.max_relative_error <= MAX_RELATIVE_ERROR:
        return f"sgemm gave wrong results (relative error {probe.max_relative_error})"
    return ""


def verdict_cache_path() -> Path:
    """Where probe results are kept: ``$TRIAGE_BLAS_CACHE``, else the user's cache directory."""
    if os.environ.get(CACHE_ENV, "").strip():
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache")
    return base / "triage-qlora" / "blas-verdicts.json"


def cache_key(path: Path, cpu: Cpu) -> str:
    """Identity of (library file, CPU, probe code): a new build, a new CPU or a changed probe is probed anew."""
    real = path.resolve()
    stat = real.stat()
    probe_hash = hashlib.sha256(PROBE.read_bytes()).hexdigest()[:12]
    return f"{real}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|cpu {cpu.fingerprint()}|probe {probe_hash}"


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: every library is simply probed again


def _write_cache(path: Path, entries: dict[str, dict]) -> None:
    """Replace the cache file atomically; an unwritable cache only costs a probe next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(entries, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError:
        pass


def prove(candidate: Candidate, cpu: Cpu, cache: Path) -> Verdict:
    """Probe ``candidate`` (or reuse the cached probe for this file and CPU) and judge it for ``cpu``."""
    if candidate.path is None or not candidate.path.exists():
        return Verdict(candidate, ProbeResult(), candidate.missing or f"{candidate.path}: no such file", False)
    key = cache_key(candidate.path, cpu)
    entries = _read_cache(cache)
    cached = key in entries
    probe = ProbeResult(**entries[key]) if cached else run_probe(candidate.path)
    if not cached and not probe.failure.startswith("probe timed out"):
        _write_cache(cache, {**_read_cache(cache), key: asdict(probe)})
    return Verdict(candidate, probe, judge(probe, cpu), cached)
