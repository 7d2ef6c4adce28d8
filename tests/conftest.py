"""Shared fixtures: a copy of the project on the tiny profile, and tiny models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import triage.runtime

triage.runtime.setup()  # before any import that may load mlx (triage/runtime/__init__.py)

from triage.config import TrainParams
from triage.offline_plots import TEMPLATE_PATH, write_html_template

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

TINY_PROFILE = {
    "run": {"models": ["tiny"], "bits": ["4bit"], "configs": ["medical_fast", "balanced_safe"]},
    "data": {
        "n_examples": 240,
        "conditions": {"wording": {"valid": 20, "test": 30}, "complaint": {"valid": 12, "test": 16}},
    },
    "lora": {"iters": 20, "batch_size": 2},
    "train": {"steps_per_report": 5, "steps_per_eval": 10, "steps_per_save": 10, "val_batches": 2},
    "evaluate": {"mc_samples": 10},
}


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in ``cwd`` with this interpreter's tools first on PATH and the copy's package.

    DVC stages call ``python stages/...``, so PATH decides which interpreter runs them.
    """
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(cwd),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    # Output goes through files, not pipes: a command that leaves a daemon behind (dvc queue start's
    # workers inherit its stdout) would otherwise keep a pipe open and block this call until it exits.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        returncode = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True).returncode
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def deep_update(target: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = value
    return target


def project_files() -> list[str]:
    """The files git tracks plus new ones not yet committed (the working tree as a user has it)."""
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split()
    return [name for name in listed if (ROOT / name).is_file()]


def offline_plots(target: Path) -> None:
    """The offline `dvc plots show` template that `make setup` writes (untracked, so not among the files)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if (ROOT / TEMPLATE_PATH).is_file():
        shutil.copy2(ROOT / TEMPLATE_PATH, target)
    else:
        write_html_template(target)


def make_project(destination: Path, profile: dict) -> Path:
    """A fresh git + DVC copy of the project with ``profile`` merged into params.yaml."""
    for name in project_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    offline_plots(destination / TEMPLATE_PATH)
    params_path = destination / "params.yaml"
    params = deep_update(yaml.safe_load(params_path.read_text()), profile)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], destination)
    run(["git", "add", "-A"], destination)
    run(["git", "commit", "-qm", "tiny profile"], destination)
    return destination


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("project"), TINY_PROFILE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A float tiny model and its 4-bit variant, built once per session."""
    from triage.weights.sources import fetch_base_model, quantize_model

    root = tmp_path_factory.mktemp("tiny")
    fetch_base_model("tiny", "builtin:tiny", root / "float")
    quantize_model(root / "float", root / "4bit", bits=4, group_size=64)
    return root


@pytest.fixture
def mlx_lm_originals(monkeypatch):
    """mlx-lm's own attention and SwiGLU, whatever an earlier test installed, put back afterwards.

    triage.model.fastmath.install swaps them process-wide, and every test that loads a model for
    inference installs it; a test of the swap itself must start from the originals.
    """
    from mlx_lm.models import activations, base, gemma3_text, llama

    monkeypatch.setattr(llama, "scaled_dot_product_attention", base.scaled_dot_product_attention)
    monkeypatch.setattr(gemma3_text, "scaled_dot_product_attention", base.scaled_dot_product_attention)
    monkeypatch.setattr(llama, "swiglu", activations.swiglu)


def train_params(**changes) -> TrainParams:
    """Training settings for the tests: params.yaml's shape, small numbers, ``changes`` on top."""
    from triage.config import TrainParams

    base = dict(
        weight_decay=0.01,
        warmup_ratio=0.1,
        schedule="cosine",
        num_layers=16,
        max_seq_length=512,
        seed=42,
        steps_per_report=10,
        steps_per_eval=20,
        steps_per_save=10,
        val_batches=2,
        fit_sample=16,
        grad_checkpoint=False,
        mask_prompt=True,
        early_stopping_patience=0,
        early_stopping_min_delta=0.0,
        select_on="val_loss",
        label_weight=1.0,
        cpu_streams=2,
        share_prompt_prefix=True,
    )
    return TrainParams(**{**base, **changes})
