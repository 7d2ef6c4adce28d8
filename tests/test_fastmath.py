"""The CPU activations match MLX's own ops, values and gradients, on every mask mlx-lm passes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu

from triage.model import fastmath


def close(a: mx.array, b: mx.array, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=rtol, atol=atol)


def test_fast_exp_is_exp_to_float32_precision_including_the_extremes():
    x = mx.concatenate([mx.linspace(-87.0, 88.0, 100_001), mx.array([-mx.inf, -1e4, -88.0, 0.0])])
    expected = mx.exp(x)
    got = fastmath.fast_exp(x)
    close(got, expected, rtol=3e-7, atol=0.0)
    assert got[-4:].tolist()[:2] == [0.0, 0.0]  # underflow gives 0, as mx.exp does


def test_fast_exp_gradient_is_its_output():
    x = mx.array([-3.0, 0.0, 0.5, 2.0])
    close(mx.grad(lambda v: (fastmath.fast_exp(v) * mx.arange(4)).sum())(x), mx.exp(x) * mx.arange(4))


def test_swiglu_values_and_gradients_match_mlx_lm():
    mx.random.seed(0)
    gate, x = mx.random.normal((3, 7, 64)) * 4, mx.random.normal((3, 7, 64))
    close(fastmath.fast_swiglu(gate, x), swiglu(gate, x))
    weight = mx.random.normal(gate.shape)
    expected = mx.grad(lambda g, v: (swiglu(g, v) * weight).sum(), argnums=(0, 1))(gate, x)
    got = mx.grad(lambda g, v: (fastmath.fast_swiglu(g, v) * weight).sum(), argnums=(0, 1))(gate, x)
    for a, b in zip(got, expected):
        close(a, b, rtol=1e-5, atol=1e-5)


def masks(length: int, span: int, batch: int, heads: int) -> dict:
    keep = mx.random.uniform(shape=(batch, 1, length, span)) > 0.3
    return {
        "none": None,
        "causal": "causal",
        "bool 2-D": mx.arange(length)[:, None] + (span - length) >= mx.arange(span)[None],
        "bool per row (left padding)": keep | (mx.arange(span) == span - 1),
        "bool per head": mx.random.uniform(shape=(batch, heads, length, span)) > -1.0,
        "additive": mx.random.normal((length, span)),
    }


@pytest.mark.parametrize("length,span", [(5, 5), (1, 9), (3, 9)], ids=["prompt", "decode", "continue"])
@pytest.mark.parametrize(
    "name", ["none", "causal", "bool 2-D", "bool per row (left padding)", "bool per head", "additive"]
)
def test_attention_matches_mlx_fast_sdpa(length, span, name):
    mx.random.seed(1)
    batch, heads, kv_heads, dim = 2, 6, 2, 8  # grouped-query heads, as in SmolLM2 and Gemma 3
    q = mx.random.normal((batch, heads, length, dim))
    k, v = mx.random.normal((batch, kv_heads, span, dim)), mx.random.normal((batch, kv_heads, span, dim))
    mask = masks(length, span, batch, heads)[name]
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)
    close(fastmath.attention(q, k, v, 0.35, mask), expected, rtol=1e-4, atol=1e-5)


def test_attention_gradient_matches():
    mx.random.seed(2)
    q, k, v = (mx.random.normal((1, 4, 6, 8)) for _ in range(3))

    def loss(fn, q, k, v):
        return (fn(q, k, v) ** 2).sum()

    reference = mx.grad(
        lambda *a: loss(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask="causal"), *a),
        argnums=(0, 1, 2),
    )(q, k, v)
    fast = mx.grad(lambda *a: loss(lambda q, k, v: fastmath.attention(q, k, v, 0.3, "causal"), *a), argnums=(0, 1, 2))(
        q, k, v
    )
    for a, b in zip(fast, reference):
        close(a, b, rtol=1e-4, atol=1e-5)


def test_install_swaps_once_and_models_still_compute_the_same(mlx_lm_originals):
    mx.random.seed(3)
    model = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=32,
            num_hidden_layers=2,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=50,
        )
    )
    tokens = mx.array([[1, 5, 9, 2, 7, 3]])
    before = model(tokens)
    assert len(fastmath.install()) == 3
    assert fastmath.install() == []
    close(model(tokens), before, rtol=1e-4, atol=1e-5)


def test_custom_function_runs_its_vjp_on_the_forward_stream():
    seen = []

    def backward(primals, cotangent, output):
        seen.append(fastmath.calling_stream())  # MLX calls this while it builds the backward graph
        return (2 * cotangent,)

    double = fastmath.custom_function(lambda x: 2 * x, backward)
    shard = mx.new_stream(mx.cpu)

    def loss(x):
        with mx.stream(shard):
            return double(x).sum()

    grad = mx.grad(loss)(mx.array([1.0, 2.0]))  # taken outside the shard's stream context
    assert seen == [shard]
    assert grad.tolist() == [2.0, 2.0]
    mx.grad(lambda x: double(x).sum())(mx.array([1.0]))
    assert seen[1] == mx.default_stream(mx.cpu)
