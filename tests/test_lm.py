"""Label scoring against a plain forward pass over prompt + label: one prompt, or a batch after a shared prefix."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import gemma3_text, llama

from triage.model.blocks import shared_lower_blocks
from triage.model.lm import batch_label_log_probs, fanned_label_log_probs, label_log_probs, shared_prefix

VOCAB = 40
# Labels of one, two and three tokens: the longer ones continue from the prompt's cache and trim it.
FMT = SimpleNamespace(label_tokens=[[5], [7, 8], [9, 10, 11]], prompt_tokens=list)


def llama_model() -> nn.Module:
    return llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=32,
            num_hidden_layers=2,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=VOCAB,
            tie_word_embeddings=True,
        )
    )


def gemma_model() -> nn.Module:
    # A sliding window of 8 with prompts up to 13 tokens exercises the rotating caches of Gemma 3's local layers.
    return gemma3_text.Model(
        gemma3_text.ModelArgs(
            model_type="gemma3_text",
            hidden_size=32,
            num_hidden_layers=6,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            rms_norm_eps=1e-6,
            vocab_size=VOCAB,
            query_pre_attn_scalar=8,
            sliding_window=8,
        )
    )


def reference_scores(model: nn.Module, prompt: list[int]) -> list[float]:
    """Sum of the label tokens' log-probabilities from one uncached forward pass per label."""
    scores = []
    for label in FMT.label_tokens:
        logprobs = nn.log_softmax(model(mx.array([prompt + label]))[0].astype(mx.float32), axis=-1)
        positions = range(len(prompt) - 1, len(prompt) + len(label) - 1)
        scores.append(sum(logprobs[p, t].item() for p, t in zip(positions, label)))
    return scores


PROMPTS = [[1, 2, 3], [4, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [2, 30, 31, 32, 33, 6]]


@pytest.mark.parametrize("build", [llama_model, gemma_model], ids=["llama", "gemma3"])
def test_batched_and_single_scores_equal_the_plain_forward_pass(build):
    mx.random.seed(3)
    model = build()
    model.eval()
    expected = np.array([reference_scores(model, prompt) for prompt in PROMPTS])
    single = np.concatenate([np.array(label_log_probs(model, FMT, prompt)) for prompt in PROMPTS])
    batched = np.array(batch_label_log_probs(model, FMT, PROMPTS))
    np.testing.assert_allclose(single, expected, atol=2e-4)
    np.testing.assert_allclose(batched, expected, atol=2e-4)


def test_copies_of_one_prompt_score_alike():
    mx.random.seed(4)
    model = llama_model()
    model.eval()
    rows = np.array(label_log_probs(model, FMT, PROMPTS[2], copies=3))
    np.testing.assert_allclose(rows, np.repeat(rows[:1], 3, axis=0), atol=1e-6)


# A shared prefix of 10 tokens (longer than Gemma's window of 8), then suffixes of 1 to 6 tokens.
PREFIXED = [list(range(20, 30)) + suffix for suffix in ([1], [4, 12, 13, 14, 15, 16], [2, 31, 6])]


@pytest.mark.parametrize("build", [llama_model, gemma_model], ids=["llama", "gemma3"])
def test_scores_after_a_shared_prefix_equal_the_plain_forward_pass(build):
    mx.random.seed(5)
    model = build()
    model.eval()
    prefix = shared_prefix(model, PREFIXED)
    assert prefix.tokens == tuple(range(20, 30))
    expected = np.array([reference_scores(model, prompt) for prompt in PREFIXED])
    np.testing.assert_allclose(np.array(batch_label_log_probs(model, FMT, PREFIXED, prefix)), expected, atol=2e-4)
    # The prefix's cache is reused, not consumed: a second batch after it scores the same.
    np.testing.assert_allclose(
        np.array(batch_label_log_probs(model, FMT, PREFIXED[1:], prefix)), expected[1:], atol=2e-4
    )


def test_a_prompt_that_does_not_continue_the_prefix_is_refused():
    model = llama_model()
    prefix = shared_prefix(model, PREFIXED)
    with pytest.raises(ValueError, match="shared prefix"):
        batch_label_log_probs(model, FMT, [[1, 2, 3]], prefix)
    with pytest.raises(ValueError, match="shared prefix"):
        batch_label_log_probs(model, FMT, [list(range(20, 30))], prefix)


def test_every_prompt_keeps_a_token_of_its_own():
    model = llama_model()
    assert shared_prefix(model, [[1, 2, 3], [1, 2, 3]]).tokens == (1, 2)
    assert shared_prefix(model, [[1, 2, 3]]).tokens == (1, 2)
    assert shared_prefix(model, [[1, 2], [3, 4]]).tokens == ()


class RowNoise(nn.Dropout):
    """A deterministic stand-in for dropout: row k is scaled by 1 + 0.3 * (k % samples).

    So each MC sample is recognisable.
    """

    def __init__(self, samples: int):
        super().__init__(0.5)
        self.samples = samples

    def __call__(self, x: mx.array) -> mx.array:
        return x * (1.0 + 0.3 * (mx.arange(x.shape[0]) % self.samples))[:, None, None]


@pytest.mark.parametrize("build", [llama_model, gemma_model], ids=["llama", "gemma3"])
def test_mc_samples_after_a_shared_prefix_equal_each_prompt_run_whole(build):
    """MC dropout runs the shared prefix once as one row per sample; every case must continue its own sample's row.

    Three samples, three prompts and labels of one to three tokens, so every input row fans out into rows
    that only the right sample's prefix keys and values score correctly.
    """
    from mlx_lm.tuner.lora import LoRALinear

    from triage.config import LoraConfig
    from triage.train.loop import add_lora

    samples = 3
    mx.random.seed(6)
    model = build()
    add_lora(
        model,
        LoraConfig(kind="standard", learning_rate=1e-3, batch_size=4, rank=4, scale=2.0, dropout=0.1, iters=1),
        len(model.model.layers) // 2,
    )
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = 0.5 * mx.random.normal(module.lora_b.shape)
            module.dropout = RowNoise(samples)
    with shared_lower_blocks(model, samples):
        whole = np.stack([np.array(label_log_probs(model, FMT, prompt)) for prompt in PREFIXED], axis=1)
        fanned = np.array(fanned_label_log_probs(model, FMT, PREFIXED, shared_prefix(model, PREFIXED)))
        with pytest.raises(ValueError, match="fans its rows out"):
            batch_label_log_probs(model, FMT, PREFIXED)
    assert whole.shape == fanned.shape == (samples, len(PREFIXED), len(FMT.label_tokens))
    assert np.ptp(whole, axis=0).min() > 1e-3  # the samples really differ
    np.testing.assert_allclose(fanned, whole, atol=2e-4)
