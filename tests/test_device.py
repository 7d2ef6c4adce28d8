"""Tests for triage.model.device: throughput probes and the CPU dequantizing QLoRA layers."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from triage.model import device, quantized

# 2 blocks x (q, k, v, o, gate, up, down) + the tied, quantized embedding.
N_QUANTIZED = 2 * 7 + 1
LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}
TOL = {"rtol": 1e-4, "atol": 1e-5}


def tiny_quantized_llama(bits: int) -> Model:
    """Random-weight llama built from mlx-lm's own classes, then quantized."""
    mx.random.seed(0)
    model = Model(
        ModelArgs(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=300,
            tie_word_embeddings=True,
        )
    )
    nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    return model


def tokens(batch: int = 2, length: int = 8, seed: int = 1) -> mx.array:
    return mx.random.randint(0, 300, (batch, length), key=mx.random.key(seed))


def add_lora(model: Model) -> None:
    """LoRA on every block as mlx-lm does it (freeze, then wrap), with non-zero
    B so that A gets gradients too."""
    model.freeze()
    linear_to_lora_layers(model, 2, dict(LORA))
    for i, (_, m) in enumerate(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape, key=mx.random.key(100 + i))
    mx.eval(model.parameters())


def loss_fn(model: Model, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(x), y).mean()


def loss_and_grads(model: Model, x: mx.array, y: mx.array) -> tuple[float, dict]:
    loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads))


def assert_grads_close(fast: dict, native: dict) -> None:
    assert fast.keys() == native.keys()
    for name in native:
        np.testing.assert_allclose(np.array(fast[name]), np.array(native[name]), **TOL, err_msg=name)


@pytest.fixture
def no_native_qmm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the native quantized kernel unusable, to prove it is not called."""

    def boom(*args, **kwargs):
        raise AssertionError("native quantized_matmul called")

    monkeypatch.setattr(mx, "quantized_matmul", boom)


def test_matmul_peak_gflops_is_positive():
    assert 0 < device.matmul_peak_gflops(n=128, repeats=2) < 1e5


def test_cpu_needs_dequantized_matmul(monkeypatch):
    assert quantized.cpu_needs_dequantized_matmul() == (mx.default_device().type == mx.cpu)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu, 0))
    assert quantized.cpu_needs_dequantized_matmul() is True  # a Mac told to use its CPU
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu, 0))
    assert quantized.cpu_needs_dequantized_matmul() is False
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert quantized.cpu_needs_dequantized_matmul() is True


def test_swap_count_idempotence_and_undo():
    model = tiny_quantized_llama(4)
    before = {k: (v.dtype, v.shape) for k, v in tree_flatten(model.parameters())}
    assert quantized.use_cpu_dequantized_matmul(model) == N_QUANTIZED
    assert quantized.use_cpu_dequantized_matmul(model) == 0
    after = {k: (v.dtype, v.shape) for k, v in tree_flatten(model.parameters())}
    assert after == before  # still quantized (uint32), nothing added
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.uint32
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert quantized.use_native_quantized_matmul(model) == N_QUANTIZED
    assert type(model.model.embed_tokens) is nn.QuantizedEmbedding


def test_optimize_for_device_switches_layers_and_activations_only_on_cpu(monkeypatch, mlx_lm_originals):
    from mlx_lm.models import gemma3_text, llama

    blas_threads = []
    monkeypatch.setattr(device, "set_blas_threads", blas_threads.append)
    monkeypatch.delenv(device.THREADS_ENV, raising=False)
    model = tiny_quantized_llama(4)
    monkeypatch.setattr(device, "cpu_needs_dequantized_matmul", lambda: False)
    assert device.optimize_for_device(model) == "GPU: MLX's native kernels"
    assert not hasattr(llama.scaled_dot_product_attention, "fast_cpu")
    assert device.cpu_streams(2) == []
    monkeypatch.setattr(device, "cpu_needs_dequantized_matmul", lambda: True)
    assert f"{N_QUANTIZED} quantized layers" in device.optimize_for_device(model)
    assert llama.scaled_dot_product_attention.fast_cpu and gemma3_text.scaled_dot_product_attention.fast_cpu
    assert len(device.cpu_streams(2)) == 2 and device.cpu_streams(1) == []
    assert blas_threads == [max(1, os.cpu_count() // 2)]  # the cores shared out among the streams


@pytest.mark.parametrize("bits", [4, 8])
def test_inference_weights_dequantized_once_give_the_per_call_logits(bits, monkeypatch):
    from mlx_lm.models import gemma3_text, llama

    for module, name in (
        (llama, "scaled_dot_product_attention"),
        (gemma3_text, "scaled_dot_product_attention"),
        (llama, "swiglu"),
    ):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(device, "cpu_needs_dequantized_matmul", lambda: True)
    model = tiny_quantized_llama(bits)
    add_lora(model)
    quantized.use_cpu_dequantized_matmul(model)
    per_call = model(tokens())
    assert "dequantized to fp32 once" in device.optimize_for_device(model, inference=True)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)  # adapters (and their dropout) stay
    np.testing.assert_allclose(np.array(model(tokens())), np.array(per_call), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])  # 3 and 6 do not pack evenly: mx.dequantize unpacks them
def test_logits_match_native(bits, request):
    model = tiny_quantized_llama(bits)
    x = tokens()
    native = model(x)
    mx.eval(native)
    quantized.use_cpu_dequantized_matmul(model)
    request.getfixturevalue("no_native_qmm")  # incl. the tied head's as_linear
    fast = model(x)
    assert fast.dtype == native.dtype == mx.float32
    np.testing.assert_allclose(np.array(fast), np.array(native), **TOL)
    assert float(mx.abs(native).max()) > 0.1  # not trivially equal


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unpacking_gives_mx_dequantize_exactly(bits, dtype):
    weight = mx.random.normal((96, 192), key=mx.random.key(7)).astype(getattr(mx, dtype))
    packed, scales, biases = mx.quantize(weight, group_size=64, bits=bits)
    expected = mx.dequantize(packed, scales, biases, group_size=64, bits=bits, dtype=mx.float32)
    unpacked = quantized._unpack_affine(bits, 64)(packed, scales, biases)
    assert unpacked.dtype == mx.float32 and unpacked.shape == (96, 192)
    assert mx.array_equal(unpacked, expected).item()


def test_few_rows_use_native_kernel(monkeypatch):
    layer = nn.QuantizedLinear(64, 32, bias=True, group_size=64, bits=4)
    layer.bias = mx.arange(32, dtype=mx.float32)
    x = mx.random.normal((1, quantized.NATIVE_MAX_ROWS, 64), key=mx.random.key(3))
    native = layer(x)
    quantized.use_cpu_dequantized_matmul(layer)
    monkeypatch.setattr(quantized, "dequantized_matmul", lambda *a: pytest.fail("dequantized"))
    assert mx.array_equal(layer(x), native).item()


def test_dequantized_layer_with_bias_matches_native(no_native_qmm):
    layer = nn.QuantizedLinear(128, 64, bias=True, group_size=64, bits=8)
    layer.bias = mx.arange(64, dtype=mx.float32) / 10
    x = mx.random.normal((5, 128), key=mx.random.key(4))
    expected = x @ mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 8).T + layer.bias
    quantized.use_cpu_dequantized_matmul(layer)
    np.testing.assert_allclose(np.array(layer(x)), np.array(expected), **TOL)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("order", ["swap_then_lora", "lora_then_swap"])
def test_lora_loss_and_grads_match_native(bits, order):
    model = tiny_quantized_llama(bits)
    if order == "swap_then_lora":
        assert quantized.use_cpu_dequantized_matmul(model) == N_QUANTIZED
        add_lora(model)
    else:
        add_lora(model)
        assert quantized.use_cpu_dequantized_matmul(model) == N_QUANTIZED
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and q_proj.lora_a.shape == (64, LORA["rank"])
    assert type(q_proj.linear).__name__ == "CPUQuantizedLinear"

    x, y = tokens(seed=1), tokens(seed=2)
    fast_loss, fast_grads = loss_and_grads(model, x, y)
    assert quantized.use_native_quantized_matmul(model) == N_QUANTIZED
    native_loss, native_grads = loss_and_grads(model, x, y)

    # Only LoRA parameters are trained; the quantized base gets no gradient.
    assert all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in fast_grads)
    assert len(fast_grads) == 2 * 14
    assert fast_loss == pytest.approx(native_loss, rel=1e-5)
    assert_grads_close(fast_grads, native_grads)
    assert all(float(mx.abs(g).max()) > 0 for g in fast_grads.values())


def test_lora_grads_under_compile_match_native():
    """mlx-lm's trainer compiles the step; the custom VJP must survive that."""
    model = tiny_quantized_llama(4)
    add_lora(model)
    x, y = tokens(seed=1), tokens(seed=2)
    native_loss, native_grads = loss_and_grads(model, x, y)
    quantized.use_cpu_dequantized_matmul(model)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    step = mx.compile(lambda x, y: value_and_grad(model, x, y), inputs=model.state)
    loss, grads = step(x, y)
    mx.eval(loss, grads)
    assert loss.item() == pytest.approx(native_loss, rel=1e-5)
    assert_grads_close(dict(tree_flatten(grads)), native_grads)


def test_the_tied_head_dequantized_once_a_step_gives_the_same_loss_and_grads(monkeypatch):
    model = tiny_quantized_llama(4)
    add_lora(model)
    quantized.use_cpu_dequantized_matmul(model)
    x, y = tokens(seed=1), tokens(seed=2)
    embedding = model.model.embed_tokens
    head_dequantized = []
    fp32_weight = quantized._fp32_weight

    def counting(w: mx.array, *rest) -> mx.array:
        head_dequantized.extend([w] if w.shape == embedding["weight"].shape else [])
        return fp32_weight(w, *rest)

    monkeypatch.setattr(quantized, "_fp32_weight", counting)

    def two_projections(model: Model, x: mx.array, y: mx.array) -> mx.array:
        with quantized.tied_head_dequantized_once(model):  # as a step with two shards uses it
            return loss_fn(model, x[:1], y[:1]) + loss_fn(model, x[1:], y[1:])

    per_call = nn.value_and_grad(model, lambda m, x, y: loss_fn(m, x[:1], y[:1]) + loss_fn(m, x[1:], y[1:]))
    expected, expected_grads = per_call(model, x, y)
    assert len(head_dequantized) == 4  # each projection and its backward pass dequantize the head
    head_dequantized.clear()
    value_and_grad = nn.value_and_grad(model, two_projections)
    loss, grads = mx.compile(lambda x, y: value_and_grad(model, x, y), inputs=model.state, outputs=model.state)(x, y)
    assert len(head_dequantized) == 1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_grads_close(dict(tree_flatten(grads)), dict(tree_flatten(expected_grads)))
    assert "as_linear" not in vars(embedding)  # the layer's own method is back
