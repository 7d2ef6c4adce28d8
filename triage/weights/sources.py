"""Base models: where they come from, the built-in tiny model, and quantized variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from triage.io import staged_directory

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB = 1024


class ModelSourceError(RuntimeError):
    """A base model cannot be obtained from its configured source."""


TINY_ARCHITECTURES = {"tiny": "llama", "tiny-gemma3": "gemma3"}
"""The built-in random-weight models (``builtin:<name>``) and the architecture each one has."""
TINY_CONFIGS: dict[str, dict] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": TINY_VOCAB,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    },
    # Gemma 3's layout in miniature: five sliding-window blocks, then one global block,
    # with a window (8 tokens) far shorter than any triage prompt.
    "gemma3": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": TINY_VOCAB,
        "sliding_window": 8,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    },
}


def write_tiny_model(out_dir: Path, seed: int = 0, architecture: str = "llama") -> None:
    """A tiny model with random weights (``TINY_CONFIGS``) and a small BPE tokenizer, for tests and smoke runs."""
    import importlib

    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    config = TINY_CONFIGS[architecture]
    mx.random.seed(seed)
    family = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = family.Model(family.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    out_dir.mkdir(parents=True)
    save_model(out_dir, model)
    save_config(config, out_dir / "config.json")
    _tiny_tokenizer().save_pretrained(str(out_dir))


def _tiny_tokenizer():
    """Byte-level BPE trained on the instruction and the knowledge base, deterministically.

    Any text still encodes exactly (bytes are the base alphabet); the merges
    only make triage prompts ~4x shorter than raw bytes, which keeps tests fast.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from triage.data.catalogue import KNOWLEDGE_DIR
    from triage.schema import INSTRUCTION, LABELS

    corpus = [INSTRUCTION, *LABELS] + [p.read_text() for p in sorted(Path(KNOWLEDGE_DIR).rglob("*.yaml"))]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


def fetch_base_model(name: str, source: str, out_dir: Path, other_models: tuple[str, ...] = ()) -> dict:
    """Write base model ``name`` as a float32 MLX model into ``out_dir``; return provenance.

    ``other_models`` (the rest of the selection) only makes the offline hint copy-pasteable.
    """
    kind, _, where = source.partition(":")
    with staged_directory(out_dir) as work:
        if kind == "builtin":
            write_tiny_model(work, architecture=TINY_ARCHITECTURES[where])
            info = {"source": source, "source_precision": "float32 (random weights)"}
        elif kind == "dir":
            _require_hf_directory(name, Path(where))
            _mlx_convert(where, work)
            info = {"source": source, "source_precision": _declared_dtype(Path(where))}
        elif kind == "hub":
            _convert_from_hub(name, where, work, other_models)
            info = {"source": source, "source_precision": _declared_dtype(work)}
        elif kind in ("gguf", "gguf-package"):
            info = {"source": source, **_convert_from_gguf(name, kind, where, work)}
        else:
            raise ModelSourceError(f"model '{name}': unsupported source '{source}'")
        (work / "source.json").write_text(json.dumps({"model": name, **info}, indent=2) + "\n")
    return {"model": name, **info}


def _require_hf_directory(name: str, path: Path) -> None:
    missing = [f for f in ("config.json",) if not (path / f).is_file()]
    weights = list(path.glob("*.safetensors"))
    if missing or not weights:
        raise ModelSourceError(
            f"model '{name}': {path} is not a Hugging Face model directory "
            f"(needs config.json and *.safetensors; found {sorted(p.name for p in path.glob('*'))[:8]})"
        )


def _mlx_convert(hf_path: str, out: Path) -> None:
    from mlx_lm import convert

    convert(hf_path=hf_path, mlx_path=str(out), dtype="float32")


def _convert_from_hub(name: str, repo: str, out: Path, other_models: tuple[str, ...]) -> None:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # the hub client raises many kinds; all mean "not downloadable here"
        raise ModelSourceError(
            f"model '{name}': cannot download '{repo}' from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}).\n"
            f"The hub is unreachable from this machine. Either\n"
            "  - point the model at a local copy: "
            f"dvc exp run -S 'models.{name}.source=dir:/path/to/{repo.split('/')[-1]}'\n"
            f"  - or leave it out of the study: dvc exp run -S 'run.models=[{','.join(other_models)}]'"
        ) from exc
    _mlx_convert(local, out)


def _convert_from_gguf(name: str, kind: str, where: str, out: Path) -> dict:
    """GGUF -> Hugging Face layout (exact dequantization) -> float32 MLX model."""
    import tempfile

    from triage.weights.gguf import UnsupportedGGUFError, convert_gguf
    from triage.weights.packaged import GGUFPackageMissingError, locate_package_gguf

    if kind == "gguf-package":
        package, _, filename = where.partition("/")
        try:
            path = locate_package_gguf(package, filename)
        except (GGUFPackageMissingError, FileNotFoundError) as exc:
            raise ModelSourceError(f"model '{name}': {exc}") from exc
    else:
        path = Path(where)
        if not path.is_file():
            raise ModelSourceError(f"model '{name}': GGUF file {path} does not exist")
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        hf_dir = Path(scratch) / "hf"
        try:
            provenance = convert_gguf(path, hf_dir)
        except UnsupportedGGUFError as exc:
            raise ModelSourceError(f"model '{name}': {exc}") from exc
        _mlx_convert(str(hf_dir), out)
    return provenance


def _declared_dtype(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    return str(config.get("torch_dtype") or config.get("dtype") or "unknown (not declared)")


def quantize_model(float_dir: Path, out_dir: Path, bits: int, group_size: int) -> dict:
    """Quantize a float MLX model with mlx-lm's affine scheme; return size facts."""
    from mlx_lm import convert

    with staged_directory(out_dir) as work:
        convert(hf_path=str(float_dir), mlx_path=str(work), quantize=True, q_bits=bits, q_group_size=group_size)
        shutil.copy(float_dir / "source.json", work / "source.json")
        facts = variant_facts(work)
    return facts


def variant_facts(model_dir: Path) -> dict:
    """Bits per weight, bytes on disk and bytes of parameters resident in memory."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import compute_bits_per_weight, load_model

    model, config = load_model(model_dir, lazy=False)
    resident = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {
        "bits_per_weight": round(float(compute_bits_per_weight(model)), 3),
        "disk_mb": round(disk / 2**20, 2),
        "resident_mb": round(resident / 2**20, 2),
        "quantization": config.get("quantization"),
    }
