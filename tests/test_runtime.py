"""Tests for triage.runtime: a BLAS proven on this CPU before it is loaded, the allocator, MLX's schedule.

No test here loads an unproven library into the pytest process: every
library that may not run on this CPU is only ever opened by a probe child.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import triage.runtime
from triage.model import device
from triage.runtime import blas, blas_proof, schedule
from triage.runtime.allocator import keep_freed_buffers
from triage.runtime.blas_proof import Candidate, Cpu, ProbeResult

ROOT = Path(__file__).resolve().parents[1]
SKYLAKEX_ONLY = "OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4"  # cmeel-openblas 0.3.31's own words
ZEN3 = Cpu("AMD EPYC (Zen 3)", frozenset("sse4_2 avx avx2 fma f16c bmi2".split()))
SKYLAKE_SERVER = Cpu(
    "Intel Xeon (Skylake-SP)", ZEN3.flags | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
)
STAND_IN_BLAS = r"""
#include <signal.h>
const char *openblas_get_config(void) { return "OpenBLAS 0.0 DYNAMIC_ARCH STANDIN MAX_THREADS=1"; }
const char *openblas_get_corename(void) { return "StandIn"; }
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
#ifdef DIE
    raise(SIGILL);  /* what an AVX-512 kernel does on a CPU without AVX-512 */
#else
    for (int i = 0; i < m * n; i++) c[i] = 0.0f;  /* a wrong product */
#endif
}
"""


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two stand-in BLAS libraries built here: one dies by SIGILL in cblas_sgemm, one returns zeros."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        pytest.skip("no C compiler to build the stand-in libraries")
    folder = tmp_path_factory.mktemp("stand_in_blas")
    (folder / "blas.c").write_text(STAND_IN_BLAS)
    built = {}
    for name, flags in (("dies", ["-DDIE"]), ("wrong", [])):
        built[name] = folder / f"lib{name}.so"
        subprocess.run(
            [compiler, "-shared", "-fPIC", *flags, "-o", str(built[name]), str(folder / "blas.c")], check=True
        )
    return built


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "verdicts.json"


def test_static_check_rejects_a_single_target_build_whose_instructions_the_cpu_lacks():
    assert blas_proof.static_problem(SKYLAKEX_ONLY, ZEN3) == (
        "built for SKYLAKEX (AVX-512); this CPU lacks avx512f, avx512bw, avx512vl, avx512dq, avx512cd"
    )
    assert blas_proof.static_problem(SKYLAKEX_ONLY, SKYLAKE_SERVER) == ""
    dynamic = "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64"
    assert blas_proof.static_problem(dynamic, Cpu("old", frozenset())) == ""
    assert "lacks avx2, fma" in blas_proof.static_problem("OpenBLAS 0.3.26 HASWELL", Cpu("old", frozenset({"avx"})))
    assert blas_proof.static_problem("", ZEN3) == ""  # not OpenBLAS: the sgemm probe decides


def test_this_cpu_reads_model_and_flags(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n"
    )
    assert blas_proof.this_cpu(cpuinfo) == Cpu("AMD EPYC", frozenset({"fpu", "avx2", "fma"}))


@pytest.mark.skipif(not blas_proof.cmeel_openblas().path, reason="cmeel-openblas is not installed")
def test_real_skylakex_only_library_is_skipped_on_a_cpu_without_avx512(cache: Path):
    """cmeel-openblas itself, judged for injected Zen 3 flags: skipped on any machine, AVX-512 or not."""
    verdict = blas_proof.prove(blas_proof.cmeel_openblas(), ZEN3, cache)
    if "SKYLAKEX" not in verdict.probe.config:
        pytest.skip(f"this cmeel-openblas is not a SKYLAKEX-only build: {verdict.probe.config!r}")
    assert not verdict.ok
    assert verdict.problem.startswith("built for SKYLAKEX (AVX-512); this CPU lacks avx512f")


def test_debian_dynamic_arch_library_passes_its_proof_on_this_cpu(cache: Path):
    found = blas_proof.debian_openblas()
    if not found:
        pytest.skip("Debian's libopenblas0-pthread is not installed (scripts/system-deps.sh installs it)")
    verdict = blas_proof.prove(found[0], blas_proof.this_cpu(), cache)
    assert verdict.ok, verdict.problem
    assert "DYNAMIC_ARCH" in verdict.probe.config and verdict.probe.core
    assert verdict.probe.max_relative_error < 1e-5


def test_a_probe_that_dies_by_a_signal_is_skipped_with_its_reason(stand_ins: dict[str, Path], cache: Path):
    verdict = blas_proof.prove(Candidate("stand-in", stand_ins["dies"]), ZEN3, cache)
    assert verdict.problem == "probe died with SIGILL (an instruction this CPU lacks)"
    assert verdict.probe.config.startswith("OpenBLAS 0.0 DYNAMIC_ARCH")  # reported before the fatal call
    wrong = blas_proof.prove(Candidate("stand-in", stand_ins["wrong"]), ZEN3, cache)
    assert wrong.problem.startswith("sgemm gave wrong results")


def test_a_probe_script_killed_by_sigill_is_reported_without_a_compiler(tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text('import os, signal\nprint(\'{"config": "x"}\', flush=True)\nos.kill(os.getpid(), signal.SIGILL)\n')
    result = blas_proof.run_probe(Path("/any/lib.so"), probe=probe)
    assert result == ProbeResult(config="x", failure="probe died with SIGILL (an instruction this CPU lacks)")
    assert blas_proof.judge(result, ZEN3) == result.failure


def test_missing_library_and_unloadable_library_are_skipped(tmp_path: Path, cache: Path):
    assert blas_proof.prove(Candidate("gone", None, "not installed"), ZEN3, cache).problem == "not installed"
    junk = tmp_path / "libjunk.so"
    junk.write_text("not an ELF file")
    assert blas_proof.prove(Candidate("junk", junk), ZEN3, cache).problem.startswith("probe failed: OSError")


def test_verdicts_are_cached_per_library_file_and_cpu(tmp_path: Path, cache: Path, monkeypatch):
    library = tmp_path / "libfake.so"
    library.write_bytes(b"v1")
    probes = []

    def fake_probe(path: Path) -> ProbeResult:
        probes.append(path)
        return ProbeResult(config="OpenBLAS 9 DYNAMIC_ARCH", core="Fake", max_relative_error=1e-7)

    monkeypatch.setattr(blas_proof, "run_probe", fake_probe)
    candidate = Candidate("fake", library)
    first = blas_proof.prove(candidate, ZEN3, cache)
    again = blas_proof.prove(candidate, ZEN3, cache)
    assert (first.ok, first.cached, again.ok, again.cached, len(probes)) == (True, False, True, True, 1)
    blas_proof.prove(candidate, SKYLAKE_SERVER, cache)  # another CPU
    assert len(probes) == 2
    library.write_bytes(b"version 2")  # another build of the library
    assert not blas_proof.prove(candidate, ZEN3, cache).cached and len(probes) == 3
    cache.write_text("{ damaged")
    assert not blas_proof.prove(candidate, ZEN3, cache).cached and len(probes) == 4


def test_verdict_cache_lives_in_the_users_cache_directory(monkeypatch, tmp_path: Path):
    monkeypatch.delenv(blas_proof.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert blas_proof.verdict_cache_path() == tmp_path / "triage-qlora" / "blas-verdicts.json"
    monkeypatch.setenv(blas_proof.CACHE_ENV, str(tmp_path / "mine.json"))
    assert blas_proof.verdict_cache_path() == tmp_path / "mine.json"


@pytest.fixture
def no_loading(monkeypatch) -> list[Path]:
    """Record the libraries choose_and_load would make global instead of loading them."""
    loaded: list[Path] = []

    def fake_global(verdict, threads):
        loaded.append(verdict.candidate.path)
        return f"openblas fake ({verdict.candidate.label})"

    monkeypatch.setattr(blas, "_make_global", fake_global)
    return loaded


def test_auto_loads_the_first_proven_candidate_and_names_the_skipped(monkeypatch, no_loading, tmp_path, cache):
    libs = {name: tmp_path / f"lib{name}.so" for name in ("cmeel", "debian")}
    for path in libs.values():
        path.write_bytes(path.name.encode())
    configs = {libs["cmeel"]: SKYLAKEX_ONLY, libs["debian"]: "OpenBLAS 0.3.21 DYNAMIC_ARCH Zen"}
    monkeypatch.setattr(blas_proof, "run_probe", lambda path: ProbeResult(configs[path], "x", 1e-7))
    monkeypatch.setattr(
        blas,
        "candidates",
        lambda choice: [Candidate("cmeel-openblas", libs["cmeel"]), Candidate("debian", libs["debian"])],
    )
    described = blas.choose_and_load("auto", None, ZEN3, cache)
    assert no_loading == [libs["debian"]]
    assert described == (
        "openblas fake (debian) [skipped cmeel-openblas: built for SKYLAKEX (AVX-512); "
        "this CPU lacks avx512f, avx512bw, avx512vl, avx512dq, avx512cd]"
    )
    no_loading.clear()
    assert blas.choose_and_load("auto", None, SKYLAKE_SERVER, cache) == "openblas fake (cmeel-openblas)"
    assert no_loading == [libs["cmeel"]]  # where it runs, the first candidate wins


def test_no_proven_blas_falls_back_to_reference_with_one_warning(monkeypatch, no_loading, capsys, cache):
    monkeypatch.setattr(blas, "candidates", lambda choice: [Candidate("cmeel-openblas", None, "not installed")])
    described = blas.choose_and_load("auto", None, ZEN3, cache)
    assert described.startswith("reference BLAS bundled with mlx (slow: install a DYNAMIC_ARCH OpenBLAS")
    warning = capsys.readouterr().err.splitlines()
    assert len(warning) == 1 and "about 30x slower" in warning[0] and "libopenblas0-pthread" in warning[0]
    assert no_loading == []
    with pytest.raises(RuntimeError, match="TRIAGE_BLAS=cmeel: no BLAS passed its proof.*not installed"):
        blas.choose_and_load("cmeel", None, ZEN3, cache)


def test_candidates_prefer_debian_and_list_each_file_once(monkeypatch, tmp_path: Path):
    debian = tmp_path / "openblas-pthread" / "libopenblas.so.0"
    debian.parent.mkdir()
    debian.write_bytes(b"x")
    (tmp_path / "libopenblas.so.0").symlink_to(debian)  # what Debian's alternatives do
    monkeypatch.setattr(blas_proof, "debian_openblas", lambda: [Candidate("debian", debian)])
    monkeypatch.setattr(blas_proof, "ldconfig_openblas", lambda: Candidate("system", tmp_path / "libopenblas.so.0"))
    monkeypatch.setattr(blas_proof, "cmeel_openblas", lambda: Candidate("cmeel", None, "not installed"))
    assert [c.label for c in blas_proof.candidates("auto")] == ["debian", "cmeel"]
    assert [c.label for c in blas_proof.candidates("system")] == ["debian"]
    assert blas_proof.candidates("/opt/lib.so") == [Candidate("/opt/lib.so", Path("/opt/lib.so"))]
    with pytest.raises(ValueError, match="unknown BLAS choice 'mkl'"):
        blas_proof.candidates("mkl")


@pytest.fixture
def fresh_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the cached description so load_fast_blas() decides again."""
    monkeypatch.setattr(blas, "_BLAS_DESCRIPTION", None)


@pytest.mark.parametrize("system", ["Darwin", "Windows"])
def test_load_fast_blas_is_noop_off_linux(system, fresh_blas, monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)  # as if mlx were not loaded yet
    monkeypatch.setattr(blas, "choose_and_load", lambda *a: pytest.fail("preloaded"))
    desc = blas.load_fast_blas()
    assert ("Accelerate" in desc) == (system == "Darwin")
    assert "no preload" in desc or system == "Darwin"


def test_load_fast_blas_admits_mlx_already_imported(fresh_blas, monkeypatch):
    import mlx.core  # noqa: F401

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(blas, "choose_and_load", lambda *a: pytest.fail("preloaded too late"))
    assert "mlx was imported before load_fast_blas()" in blas.load_fast_blas()


def test_load_fast_blas_is_cached(fresh_blas, monkeypatch):
    first = blas.load_fast_blas()
    monkeypatch.setattr(blas, "_describe_or_load", lambda *a: pytest.fail("not cached"))
    assert blas.load_fast_blas() == first


def test_explicit_blas_that_cannot_load_raises(fresh_blas, monkeypatch, cache):
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    monkeypatch.setattr(blas, "global_symbol_provider", lambda symbol="": None)
    monkeypatch.setenv(blas.BLAS_ENV, "/nonexistent/libopenblas.so.0")
    monkeypatch.setenv(blas_proof.CACHE_ENV, str(cache))
    with pytest.raises(RuntimeError, match="no BLAS passed its proof.*no such file"):
        blas.load_fast_blas()


def test_a_preloaded_library_that_cannot_run_here_fails_clearly(fresh_blas, monkeypatch, stand_ins, cache):
    """LD_PRELOAD of a library built for another CPU: a clear error, not a SIGILL at the first matmul."""
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    monkeypatch.setattr(blas, "global_symbol_provider", lambda symbol="": str(stand_ins["dies"]))
    monkeypatch.setenv(blas_proof.CACHE_ENV, str(cache))
    with pytest.raises(RuntimeError, match="LD_PRELOAD.*probe died with SIGILL"):
        blas.load_fast_blas()


@pytest.mark.skipif(platform.system() != "Linux", reason="preload is Linux-only")
def test_preload_takes_effect_in_fresh_process(tmp_path: Path):
    """A fresh process picks a proven BLAS by itself: really faster, and saying what it loaded."""
    reference = device.measure_blas_in_subprocess("reference", n=512, repeats=3)
    assert "reference BLAS bundled with mlx" in reference["blas"]
    # One thread: with two, a busy shared CPU makes the timing erratic.
    auto = device.measure_blas_in_subprocess("auto", n=512, repeats=5, threads=1)
    proven = [blas_proof.prove(c, blas_proof.this_cpu(), tmp_path / "v.json").ok for c in blas_proof.candidates("auto")]
    if not any(proven):
        # Nothing runs here: the log must say so, not claim a speed-up.
        assert auto["blas"].startswith("reference BLAS bundled with mlx (slow")
        pytest.skip(f"no optimised BLAS passes its proof here: {auto['blas']}")
    assert auto["blas"].startswith("openblas") and ", 1 threads" in auto["blas"], auto
    assert "proven on this CPU" in auto["blas"]
    assert auto["gflops"] > 3 * reference["gflops"], (auto, reference)


def test_setup_is_idempotent_and_recorded_as_triage_runtime():
    runtime = triage.runtime.setup()  # conftest.py made the first call
    assert triage.runtime.setup() is runtime and triage.runtime.settled() is runtime
    assert (triage.BLAS, triage.ALLOCATOR, triage.SCHEDULE) == (runtime.blas, runtime.allocator, runtime.schedule)
    assert triage.RUNTIME == str(runtime) == f"BLAS: {runtime.blas}; {runtime.allocator}; {runtime.schedule}"
    assert runtime.blas == blas.load_fast_blas()
    with pytest.raises(AttributeError, match="no attribute 'NOTHING'"):
        triage.NOTHING  # noqa: B018


def test_importing_triage_settles_nothing():
    """The set-up is a call each entry point makes, not a side effect of importing the package."""
    env = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"}
    code = (
        "import os, triage, triage.runtime\n"
        "from triage.runtime import blas\n"
        "print(triage.runtime.settled(), blas._BLAS_DESCRIPTION, os.environ.get('MLX_BFS_MAX_WIDTH'))\n"
        "try:\n    triage.RUNTIME\nexcept AttributeError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.splitlines()
    assert out == [
        "None None None",
        "triage.RUNTIME: triage.runtime.setup() has not run in this process; "
        "an entry point calls it before anything imports mlx",
    ]


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's mallopt: Linux only")
def test_setup_keeps_freed_buffers_for_reuse_on_linux():
    assert triage.runtime.setup().allocator == "glibc malloc keeping freed buffers for reuse"
    assert keep_freed_buffers() == triage.ALLOCATOR  # idempotent

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    before = mallinfo2().hblkhd
    block = bytearray(40 << 20)  # far above glibc's largest mmap threshold (32 MB)
    assert mallinfo2().hblkhd == before  # served from the heap, not a fresh mapping
    del block


def test_widen_schedule_respects_the_user_and_builds_without_mlx_cpu(monkeypatch):
    monkeypatch.setenv(schedule.SCHEDULE_ENV, "7")
    assert schedule.widen_schedule() == "MLX_BFS_MAX_WIDTH=7 (set by the user)"
    assert os.environ[schedule.SCHEDULE_ENV] == "7"
    monkeypatch.delenv(schedule.SCHEDULE_ENV)

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(schedule.metadata, "distribution", absent)
    assert "MLX's default evaluation order" in schedule.widen_schedule()
    assert schedule.SCHEDULE_ENV not in os.environ


def test_setup_widens_the_schedule_before_mlx_evaluates():
    env = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"}
    code = (
        "import triage.runtime, os; print(triage.runtime.setup().schedule); print(os.environ.get('MLX_BFS_MAX_WIDTH'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.splitlines()
    if _has_distribution("mlx-cpu"):
        assert out == [
            f"MLX_BFS_MAX_WIDTH={schedule.WIDE_SCHEDULE}: CPU streams are scheduled side by side",
            str(schedule.WIDE_SCHEDULE),
        ]
    else:
        assert out[1] == "None"


def _has_distribution(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True
