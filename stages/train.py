"""Train one LoRA adapter on a quantized variant.

    dvc repro train@smollm2-135m-4bit-balanced_safe

Resumes from its checkpoint (outside the DVC cache) when re-run after a kill.
"""

import argparse
import shutil
from dataclasses import asdict
from pathlib import Path

import triage  # selects the fast BLAS before MLX loads
import mlx.core as mx
from mlx_lm import load

from triage.model.device import optimize_for_device
from triage.train.batches import validation_indices
from triage.config import load_params
from triage.train.validation import task_metrics
from triage.io import write_json
from triage.model.lm import ChatFormat, check_supported, tokenize_split
from triage.train.losses import make_completion_loss, make_safety_loss
from triage.schema import read_examples
from triage.stage import run_stage
from triage.train.loop import TrainingDiverged, add_lora, fingerprint, run_training, save_adapter, tree_digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True, help="DVCLive directory for the training curves")
    parser.add_argument("--checkpoints", type=Path, required=True)
    args = parser.parse_args()

    params = load_params()
    config = params.config(args.config)
    mx.random.seed(params.train.seed)
    model, tokenizer = load(str(args.model_dir))
    check_supported(model)
    fmt = ChatFormat(tokenizer)
    max_len = params.train.max_seq_length
    train_path, valid_path = (args.data / f"{name}.jsonl" for name in ("train", "valid"))
    valid_examples = read_examples(valid_path)
    train_cases = tokenize_split(fmt, read_examples(train_path), str(train_path), max_len)
    val_cases = tokenize_split(fmt, valid_examples, str(valid_path), max_len)

    lora = add_lora(model, config, params.train.num_layers)
    print(f"[train] {triage.RUNTIME}; {optimize_for_device(model)}")
    print(f"[train] {args.config} ({config.kind}): rank {config.rank}, scale {config.scale}, "
          f"dropout {config.dropout}, lr {config.learning_rate}, batch {config.batch_size}, "
          f"{config.iters} iters; {lora['trainable_params']:,} trainable parameters "
          f"({lora['trainable_share']:.3%})")
    weight = params.train.label_weight
    if config.kind == "safety":
        loss = make_safety_loss(fmt.label_first_tokens, config.class_weights, config.cost_matrix, weight)
    else:
        loss = make_completion_loss(weight)
    # Accuracy and ED AUROC at every validation, on the cases the validation batches hold.
    picked = validation_indices(val_cases, config.batch_size, params.train.val_batches, params.train.seed)
    val_examples = [valid_examples[i] for i in picked]
    run_id = fingerprint(asdict(config), asdict(params.train), tree_digest(args.model_dir), tree_digest(args.data))
    result = run_training(model, train_cases, val_cases, config, params.train, loss, args.checkpoints, run_id,
                          lambda streams: task_metrics(model, fmt, val_examples, config.batch_size, streams),
                          log_dir=args.log)

    save_adapter(args.adapter, model, lora["adapter_config"])
    write_json(args.metrics, {
        "config": args.config, "kind": config.kind, "loss": "cost_sensitive" if config.kind == "safety" else "cross_entropy",
        "label_weight": weight,
        **{k: getattr(config, k) for k in ("rank", "scale", "dropout", "learning_rate", "batch_size", "iters")},
        "trainable_params": lora["trainable_params"], "trainable_share": round(lora["trainable_share"], 6),
        **result.metrics,
    })
    shutil.rmtree(args.checkpoints, ignore_errors=True)


if __name__ == "__main__":
    run_stage(main, "train", (TrainingDiverged,))
