"""Stage scripts as a user runs them: clean errors, no partial outputs, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, deep_update


def stage(name: str, *args: str, cwd: Path, **env_vars: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_vars}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / f"{name}.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def workdir(tmp_path: Path, changes: dict) -> Path:
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), changes)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


@pytest.mark.parametrize(
    "content, where",
    [
        ('{"prompt": "a", "completion": "ED"}\n{"prompt": "b", "completion": \n', "cases.jsonl:2"),
        ('{"prompt": "a", "completion": "ED"}\n{"prompt": "b"}\n', "cases.jsonl:2: field 'completion'"),
        ('{"prompt": "a", "completion": "urgent care"}\n', "cases.jsonl:1: field 'completion'"),
    ],
)
def test_prepare_rejects_bad_input_cleanly_and_writes_nothing(tmp_path, content, where):
    (tmp_path / "cases.jsonl").write_text(content)
    cwd = workdir(tmp_path, {"data": {"source": "prompt_completion", "path": "cases.jsonl"}})
    code, _, err = finish(stage("prepare", "--out", "data/prepared", cwd=cwd))
    assert code == 1
    assert where in err and "Traceback" not in err
    assert not (cwd / "data/prepared").exists()


def test_prepare_imports_a_users_file(tmp_path):
    rows = [{"prompt": f"case {i} " + "x" * (i % 7), "completion": ["ED", "GP", "HOME"][i % 3]} for i in range(60)]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cwd = workdir(tmp_path, {"data": {"source": "prompt_completion", "path": "cases.jsonl"}})
    code, out, err = finish(stage("prepare", "--out", "data/prepared", cwd=cwd))
    assert code == 0, err
    counts = {
        s: len((cwd / "data/prepared" / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "valid", "test")
    }
    assert sum(counts.values()) == 60 and min(counts.values()) >= 3


def test_convert_of_a_hub_model_offline_names_the_alternatives(tmp_path):
    cwd = workdir(tmp_path, {"models": {"smollm2-360m": {"source": "hub:HuggingFaceTB/SmolLM2-360M-Instruct"}}})
    # Offline mode makes the hub client fail at once, as it does on a machine without network.
    code, _, err = finish(
        stage("convert", "--model", "smollm2-360m", "--out", "models/x/float", cwd=cwd, HF_HUB_OFFLINE="1")
    )
    assert code == 1 and "Traceback" not in err
    assert "smollm2-360m" in err and "dir:" in err and "run.models=[" in err
    assert not (cwd / "models/x/float").exists()


TRAIN_PROFILE = {
    "data": {"n_examples": 120},
    "lora": {"iters": 30, "batch_size": 2},
    "train": {"steps_per_report": 5, "steps_per_eval": 10, "steps_per_save": 5, "val_batches": 1},
}


def train_args(run: str) -> list[str]:
    return [
        "--config",
        "balanced_safe",
        "--model-dir",
        "model",
        "--data",
        "data/prepared",
        "--adapter",
        f"{run}/adapter",
        "--metrics",
        f"{run}/train.json",
        "--log",
        f"{run}/dvclive",
        "--checkpoints",
        f"{run}/checkpoints",
    ]


def test_training_killed_with_sigkill_resumes_to_the_same_adapter(tmp_path, tiny_model_dir):
    cwd = workdir(tmp_path, TRAIN_PROFILE)
    os.symlink(tiny_model_dir / "4bit", cwd / "model")
    assert finish(stage("prepare", "--out", "data/prepared", cwd=cwd))[0] == 0

    assert finish(stage("train", *train_args("straight"), cwd=cwd))[0] == 0

    victim = stage("train", *train_args("killed"), cwd=cwd)
    checkpoint = cwd / "killed/checkpoints/checkpoint.json"
    deadline = time.time() + 300
    while not (checkpoint.exists() and json.loads(checkpoint.read_text())["step"] >= 10):
        assert victim.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (cwd / "killed/adapter").exists()

    code, out, err = finish(stage("train", *train_args("killed"), cwd=cwd))
    assert code == 0, err
    assert "resuming from step" in out
    metrics = json.loads((cwd / "killed/train.json").read_text())
    assert metrics["resumed_from_step"] >= 10
    import mlx.core as mx

    straight = mx.load(str(cwd / "straight/adapter/adapters.safetensors"))
    resumed = mx.load(str(cwd / "killed/adapter/adapters.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        np.testing.assert_allclose(np.array(resumed[key]), np.array(straight[key]), rtol=1e-5, atol=1e-6)
    for curve in ("train/loss.tsv", "val/loss.tsv"):  # the resumed run's DVCLive log has every step once
        straight_rows, resumed_rows = (
            [line.split("\t") for line in (cwd / run / "dvclive/plots/metrics" / curve).read_text().splitlines()]
            for run in ("straight", "killed")
        )
        assert [row[0] for row in resumed_rows] == [row[0] for row in straight_rows], curve
        np.testing.assert_allclose(
            [float(r[1]) for r in resumed_rows[1:]], [float(r[1]) for r in straight_rows[1:]], rtol=1e-4
        )
    assert not (cwd / "killed/checkpoints").exists()
