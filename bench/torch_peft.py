"""Reference point for ``bench/run.py``: LoRA training steps with transformers + PEFT on PyTorch CPU.

Runs in its own virtual environment (torch stays out of the project's requirements),
started by ``bench/run.py`` as a subprocess; it imports nothing from ``triage``.

    python bench/torch_peft.py --model-dir HF_DIR --batches BATCHES.json --out RESULT.json

``BATCHES.json`` holds the exact token sequences the MLX side trains on, either
the synthetic shape (``{"sequences": [[...], ...], "completion_tokens": C,
"batch_size": B}``: the last C tokens of each sequence are the completion) or
the real job's batches in order (``{"batches": [[{"tokens": [...],
"prompt_length": P}, ...], ...]}``), each padded on the right to its longest
row with an attention mask. The loss is the standard Hugging Face one:
``labels`` set to -100 on the prompt and the padding, so the model computes
logits at every position and the loss only on the completion.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import peft
import torch
import transformers

# mlx-lm's default LoRA targets for llama-style blocks: every linear of the block.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100  # Hugging Face's "no loss here" label


def load_lora_model(model_dir: Path, rank: int, scale: float, dropout: float, num_layers: int):
    """The float32 model with PEFT LoRA on the top ``num_layers`` blocks, in training mode.

    PEFT scales the update by ``lora_alpha / r``; ``alpha = scale * rank`` makes
    that equal to mlx-lm's ``scale``.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config.use_cache = False  # training: no key/value cache to build
    blocks = model.config.num_hidden_layers
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=scale * rank,
        lora_dropout=dropout,
        target_modules=TARGET_MODULES,
        layers_to_transform=list(range(blocks - num_layers, blocks)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config)
    model.train()
    return model


def make_batches(spec: dict) -> list[dict[str, torch.Tensor]]:
    """The model's inputs per batch; labels keep only the completion tokens."""
    if "batches" in spec:
        return [padded_batch(batch) for batch in spec["batches"]]
    size, completion = spec["batch_size"], spec["completion_tokens"]
    ids = torch.tensor(spec["sequences"], dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -completion:] = ids[:, -completion:]
    return [
        {"input_ids": ids[i : i + size], "labels": labels[i : i + size]} for i in range(0, len(ids) - size + 1, size)
    ]


def padded_batch(cases: list[dict]) -> dict[str, torch.Tensor]:
    """Cases of different lengths, right-padded to the longest, with the attention mask and the labels
    that skip the padding."""
    width = max(len(case["tokens"]) for case in cases)
    ids = torch.zeros((len(cases), width), dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row, case in enumerate(cases):
        tokens, start = case["tokens"], case["prompt_length"]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        labels[row, start : len(tokens)] = ids[row, start : len(tokens)]
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def train_steps(model, batches: list, steps: int, learning_rate: float) -> list[float]:
    """Wall time of each of ``steps`` full steps: forward, backward, AdamW update."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.01)
    times = []
    for step in range(steps):
        inputs = batches[step % len(batches)]
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()} at step {step}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="Hugging Face model directory (float32)")
    parser.add_argument("--batches", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="steps run before the timed ones")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's, i.e. the cores)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = json.loads(args.batches.read_text())
    model = load_lora_model(args.model_dir, args.rank, args.scale, args.dropout, args.num_layers)
    batches = make_batches(spec)
    times = train_steps(model, batches, args.warmup + args.steps, learning_rate=1e-5)
    measured = times[args.warmup :]
    result = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "threads": torch.get_num_threads(),
        "attention": model.config._attn_implementation,
        "step_seconds": [round(t, 3) for t in times],
        "warmup_steps": args.warmup,
        "token_positions_per_step": [int(batch["input_ids"].numel()) for batch in batches[: len(times)]],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        # Whole process (Python, torch, weights, activations): not comparable byte for byte with MLX's allocator peak.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if "sequences" in spec:  # one shape: the fastest step, as the MLX side reports it
        tokens = spec["batch_size"] * len(spec["sequences"][0])
        result |= {
            "tokens_per_step": tokens,
            "train_tokens_per_s": tokens / min(measured),
            "train_tokens_per_s_median": tokens / sorted(measured)[len(measured) // 2],
            "logits_positions_per_sequence": len(spec["sequences"][0]),
        }
    else:  # the real job: every timed step counts, as a run spends them
        rows = sum(len(batch["input_ids"]) for batch in batches[args.warmup : len(times)])
        result |= {"seconds_per_step": sum(measured) / len(measured), "cases_per_s": rows / sum(measured)}
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
