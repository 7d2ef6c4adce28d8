"""Smoke test of bench/run.py: it runs end to end on the tiny model and reports every key.

Not a timing test: the numbers of a tiny random model on a shared machine mean nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANT_KEYS = {
    "train_tokens_per_s",
    "train_gflops",
    "train_mfu",
    "peak_memory_mb",
    "eval_cases_per_s",
    "mc_samples_per_s",
    "label_scoring_s_per_case",
    "generation_s_per_case",
    "mc_batch_s",
}
TARGETS = {
    "q4_vs_float_training",
    "training_mfu",
    "vs_torch_peft",
    "label_scoring_vs_generation",
    "mc_batch_vs_sequential",
    "real_workload_vs_torch_peft",
}
NOT_MEASURED_WITHOUT_TORCH = {"vs_torch_peft", "real_workload_vs_torch_peft"}


def test_smoke_run_writes_every_key(tmp_path):
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--smoke",
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["matmul_peak_gflops"] == max(report["matmul_peak_runs"]) > 0 and len(report["matmul_peak_runs"]) == 3
    assert set(report["cpu_ns_per_element"]) == {"add", "exp", "sigmoid", "bernoulli", "dequantize_4bit"}
    for variant in ("float", "q8", "q4"):
        assert VARIANT_KEYS <= set(report[variant]), variant
        assert report[variant]["train_tokens_per_s"] > 0
        assert report[variant]["train_mfu"] == report[variant]["train_gflops"] / report["matmul_peak_gflops"]
    # The CPU QLoRA path was measured: quantized layers dequantizing per call.
    assert re.search(r"CPU: [1-9]\d* quantized layers dequantize per call", report["q4"]["cpu_path"])
    assert "mc_sequential_s" in report["q4"]
    assert "completion positions" in report["flops"]["formula"]
    assert report["flops"]["C"] == report["setup"]["completion_positions"] > 0
    assert set(report["targets"]) == TARGETS
    for name in NOT_MEASURED_WITHOUT_TORCH:  # not measured in a smoke run, and says so
        assert report["targets"][name]["met"] is None
    assert "skipped" in report["torch_peft"] and "skipped" in report["real_workload"]["torch_peft"]
    assert all(
        isinstance(t["met"], bool) for name, t in report["targets"].items() if name not in NOT_MEASURED_WITHOUT_TORCH
    )
    real = report["real_workload"]
    assert real["config"] == "medical_baseline" and real["timed_steps"] == 2
    for variant in ("float", "q8", "q4", "q4_plain_batch"):
        assert len(real[variant]["step_seconds"]) == 2 and real[variant]["cases_per_s"] > 0, variant
        assert len(real[variant]["warmup_step_seconds"]) == real["warmup_steps"] >= 1, variant
    assert real["q4"]["share_prompt_prefix"] and not real["q4_plain_batch"]["share_prompt_prefix"]
    positions = real["token_positions_per_step"]
    assert real["shared_prefix_tokens"] > 0 and positions["shared_prefix"] < positions["plain_batch"]
    assert all(count >= 1 for count in real["step_shapes_per_epoch"].values())
    assert "cases/s" in done.stdout
    assert "target" in done.stdout and "train tok/s" in done.stdout
    assert (tmp_path / "cache" / ".gitignore").read_text() == "*\n"
