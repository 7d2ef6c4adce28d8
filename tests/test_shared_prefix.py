"""Training on the prompt prefix every case shares, run once per step: the plain batch's loss and gradients."""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from test_lm import gemma_model, llama_model
from triage.config import LoraConfig
from triage.model.completion import collate, plain_loss
from triage.model.frozen import frozen_blocks, record_frozen_prefix
from triage.model.lm import TokenizedCase
from triage.train.batches import make_iterate_batches, prefix_length
from triage.train.loop import add_lora
from triage.train.losses import make_safety_loss, sharded, split_cross_entropy

LABEL_TOKENS = [5, 7, 9]
COST = {
    "ED": {"ED": 0.0, "GP": 50.0, "HOME": 100.0},
    "GP": {"ED": 2.0, "GP": 0.0, "HOME": 1.0},
    "HOME": {"ED": 2.0, "GP": 1.0, "HOME": 0.0},
}
WEIGHTS = {"ED": 4.0, "GP": 2.0, "HOME": 1.0}
# Ten shared prompt tokens, longer than the tiny Gemma's window of 8, then prompts and completions of other lengths.
PREFIX = list(range(20, 30))
TAILS = [([1], [5, 13, 14]), ([4, 12, 13, 14, 15, 16], [7]), ([2, 31, 6], [9, 33, 34, 35, 36]), ([3, 17], [5, 18])]


def cases() -> list[TokenizedCase]:
    return [
        TokenizedCase(PREFIX + prompt + completion, len(PREFIX) + len(prompt), LABEL_TOKENS.index(completion[0]))
        for prompt, completion in TAILS
    ]


def adapted(build, num_layers: int = -1) -> nn.Module:
    """A tiny random model with LoRA on its top blocks (-1: all).

    Its B matrices are random so that every adapter weight has a gradient.
    """
    mx.random.seed(11)
    model = build()
    add_lora(
        model,
        LoraConfig(kind="standard", learning_rate=1e-3, batch_size=4, rank=4, scale=2.0, dropout=0.0, iters=1),
        num_layers,
    )
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = 0.2 * mx.random.normal(module.lora_b.shape)
    model.train()
    return model


def test_the_shared_part_stops_before_each_prompt_ends():
    assert prefix_length(cases(), mask_prompt=True) == len(PREFIX)
    assert prefix_length(cases(), mask_prompt=False) == 0
    one = [TokenizedCase([20, 21, 5], 2, 0), TokenizedCase([20, 21, 7], 2, 1)]
    assert prefix_length(one, mask_prompt=True) == 1  # the last prompt token predicts the label


def test_a_batch_without_the_shared_prefix_is_refused():
    mixed = cases() + [TokenizedCase([1, 2, 3, 5], 3, 0)]
    with pytest.raises(ValueError, match="same 10 prompt tokens"):
        collate(mixed, mask_prompt=True, shared=len(PREFIX))
    with pytest.raises(ValueError, match="mask_prompt"):
        collate(cases(), mask_prompt=False, shared=len(PREFIX))


@pytest.mark.parametrize("shards", [1, 2], ids=["one stream", "two shards"])
@pytest.mark.parametrize("build", [llama_model, gemma_model], ids=["llama", "gemma3"])
def test_the_shared_prefix_gives_the_plain_batch_loss_and_lora_gradients(build, shards):
    model = adapted(build)
    plain, shared = collate(cases(), True), collate(cases(), True, shared=len(PREFIX))
    assert shared[-1].shape == (1, len(PREFIX))
    streams = [mx.new_stream(mx.cpu) for _ in range(shards)] if shards > 1 else []
    for name, loss in LOSSES.items():
        expected = nn.value_and_grad(model, loss)(model, *plain)
        assert_same_loss_and_gradients(nn.value_and_grad(model, sharded(loss, streams))(model, *shared), expected, name)
    np.testing.assert_allclose(
        np.array(split_cross_entropy(model, *shared)), np.array(split_cross_entropy(model, *plain)), rtol=1e-5
    )


LOSSES = {"plain": plain_loss, "safety": make_safety_loss(LABEL_TOKENS, WEIGHTS, COST, label_weight=3.0)}


def assert_same_loss_and_gradients(got: tuple, want: tuple, name: str) -> None:
    (value, n_value), grads = got
    (expected, n_expected), grads_expected = want
    assert int(n_value) == int(n_expected)
    assert float(value) == pytest.approx(float(expected), rel=1e-5), name
    for (key, wanted), (_, computed) in zip(tree_flatten(grads_expected), tree_flatten(grads), strict=True):
        assert float(mx.abs(wanted).max()) > 0, key  # every adapter weight is trained, prefix included
        # fp32 rounding relative to the tensor's scale (measured: up to 1.3e-5 on Gemma): sums run in another order
        scale = float(mx.abs(wanted).max())
        np.testing.assert_allclose(
            np.array(computed), np.array(wanted), rtol=1e-4, atol=1e-4 * scale, err_msg=f"{name} {key}"
        )


@pytest.mark.parametrize("shards", [1, 2], ids=["one stream", "two shards"])
@pytest.mark.parametrize("build, adapted_blocks", [(llama_model, 1), (gemma_model, 2)], ids=["llama", "gemma3"])
def test_the_frozen_blocks_replayed_once_give_the_plain_batch_loss_and_lora_gradients(build, adapted_blocks, shards):
    model = adapted(build, adapted_blocks)
    blocks = len(model.model.layers) - adapted_blocks  # Gemma's 4 are sliding-window blocks, narrower than the prefix
    assert frozen_blocks(model) == blocks
    plain, shared = collate(cases(), True), collate(cases(), True, shared=len(PREFIX))
    streams = [mx.new_stream(mx.cpu) for _ in range(shards)] if shards > 1 else []
    prefix = record_frozen_prefix(model, PREFIX)
    assert len(prefix.replays) == blocks
    for name, loss in LOSSES.items():
        expected = nn.value_and_grad(model, loss)(model, *plain)
        # compiled, as mlx-lm's trainer runs its step: the blocks stand in while it traces
        value_and_grad = nn.value_and_grad(model, sharded(loss, streams, prefix))
        step = mx.compile(functools.partial(value_and_grad, model), inputs=model.state, outputs=model.state)
        assert_same_loss_and_gradients(step(*shared), expected, name)
    assert all(isinstance(block, type(model.model.layers[-1])) for block in model.model.layers)  # its own blocks back
    top = prefix.replays[-1]
    top.output = mx.zeros_like(top.output)  # the step reads the recording, not the blocks
    tampered = sharded(plain_loss, streams, prefix)(model, *shared)[0]
    assert abs(float(tampered) - float(plain_loss(model, *plain)[0])) > 1e-3
    with pytest.raises(ValueError, match="shares 9 prefix tokens"):
        sharded(plain_loss, streams, prefix)(model, *collate(cases(), True, shared=len(PREFIX) - 1))


def test_the_batches_mlx_lm_sees_share_the_prefix_only_when_asked():
    shared = next(make_iterate_batches(True, seed=1)(cases(), 2, 512))
    plain = next(make_iterate_batches(True, seed=1, share_prefix=False)(cases(), 2, 512))
    assert shared[-1].tolist() == [PREFIX] and plain[-1].shape == (1, 0)
    assert shared[1].tolist() == plain[1].tolist()  # the same cases, in the same order
