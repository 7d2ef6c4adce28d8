"""Gemma 3 through train and evaluate, as for the llama: 20 of the study's 40 offline runs are Gemma-3-270M.

A tiny random Gemma 3 (6 blocks: 5 sliding-window, 1 global; window 8) whose
prompts are many times longer than the window, so the rotating caches of its
local layers are what the shared-prefix scoring and MC dropout go through.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from conftest import ROOT, train_params
from triage.config import LoraConfig, load_params
from triage.data.synth import generate
from triage.evaluate.language_model import evaluate_model
from triage.evaluate.mc_dropout import adapter_dropout
from triage.io import write_jsonl
from triage.model.device import optimize_for_device
from triage.model.lm import ChatFormat, tokenize_split
from triage.model.mlx_lm_internals import check_supported
from triage.model.scoring import label_probabilities
from triage.schema import LABELS, read_examples
from triage.train.loop import add_lora, run_training, save_adapter
from triage.train.losses import make_completion_loss
from triage.weights.sources import fetch_base_model, quantize_model

MIX = {"ED": 0.3, "GP": 0.45, "HOME": 0.25}
WINDOW = 8


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-gemma3")
    fetch_base_model("tiny-gemma3", "builtin:tiny-gemma3", root / "float")
    quantize_model(root / "float", root / "4bit", bits=4, group_size=32)
    return root / "4bit"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    examples = generate(36, MIX, seed=11)
    directory = tmp_path_factory.mktemp("prepared")
    for name, part in (("train", examples[:24]), ("valid", examples[24:30]), ("test", examples[30:])):
        write_jsonl(directory / f"{name}.jsonl", [e.to_json() for e in part])
    return directory


def test_the_tiny_gemma_has_sliding_window_layers_shorter_than_a_prompt(gemma_dir, data_dir):
    config = json.loads((gemma_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["sliding_window"] == WINDOW
    model, tokenizer = load(str(gemma_dir))
    check_supported(model)
    fmt = ChatFormat(tokenizer)
    shortest = min(len(fmt.prompt_tokens(e.prompt)) for e in read_examples(data_dir / "test.jsonl"))
    assert shortest > 4 * WINDOW
    assert {layer.self_attn.is_sliding for layer in model.layers} == {True, False}


def test_gemma3_trains_and_evaluates_like_the_llama(gemma_dir, data_dir, tmp_path):
    mx.random.seed(0)
    model, tokenizer = load(str(gemma_dir))
    fmt = ChatFormat(tokenizer)
    config = LoraConfig(kind="standard", learning_rate=2.0e-3, batch_size=4, rank=4, scale=20.0, dropout=0.1, iters=6)
    lora = add_lora(model, config, num_layers=-1)
    optimize_for_device(model)
    params = train_params(
        weight_decay=0.0,
        warmup_ratio=0.0,
        schedule="constant",
        num_layers=-1,
        max_seq_length=2048,
        seed=3,
        steps_per_report=3,
        steps_per_eval=3,
        steps_per_save=100,
        val_batches=-1,
        label_weight=5.0,
    )
    train = tokenize_split(fmt, read_examples(data_dir / "train.jsonl"), "train", 2048)
    valid = tokenize_split(fmt, read_examples(data_dir / "valid.jsonl"), "valid", 2048)
    result = run_training(
        model,
        train,
        valid,
        config,
        params,
        make_completion_loss(params.label_weight),
        tmp_path / "checkpoints",
        "gemma",
    )
    losses = [row["train_loss"] for row in result.train_rows]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    save_adapter(tmp_path / "adapter", model, lora["adapter_config"])

    adapted, tokenizer = load(str(gemma_dir), adapter_path=str(tmp_path / "adapter"))
    optimize_for_device(adapted, inference=True)
    base, _ = load(str(gemma_dir))
    optimize_for_device(base, inference=True)
    prompts = [e.prompt for e in read_examples(data_dir / "test.jsonl")]
    assert not np.allclose(label_probabilities(adapted, fmt, prompts, 4), label_probabilities(base, fmt, prompts, 4))

    evaluate = load_params(ROOT / "params.yaml").evaluate
    evaluation = evaluate_model(
        adapted,
        ChatFormat(tokenizer),
        data_dir,
        replace(evaluate, mc_samples=3),
        2048,
        (0.9, "evaluate.ed_threshold_target"),
        adapter_dropout(tmp_path / "adapter"),
    )
    metrics = evaluation.metrics
    assert metrics["n_cases"] == 6 and math.isfinite(metrics["test_loss"])
    assert metrics["mc_dropout"]["applicable"] and len(evaluation.predictions) == 6
    assert {row["pred"] for row in evaluation.predictions} <= set(LABELS)
