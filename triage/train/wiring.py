"""The train stage as one library call, :func:`train_adapter`; bench/run.py times the same model and objective.

:func:`lora_model` is the model as the stage trains it, and
:func:`triage.train.losses.objective` the loss of its config.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load

import triage
from triage.config import LoraConfig, Params
from triage.io import write_json
from triage.model.device import optimize_for_device
from triage.model.lm import ChatFormat, TokenizedCase, tokenize_split
from triage.model.mlx_lm_internals import check_supported
from triage.schema import Example, read_examples
from triage.train.batches import validation_indices
from triage.train.loop import TrainResult, add_lora, fingerprint, run_training, save_adapter, tree_digest
from triage.train.losses import objective
from triage.train.validation import sample_accuracy, task_metrics, train_sample


@dataclass(frozen=True)
class LoraModel:
    """A model variant ready to train: LoRA on its top blocks, this device's fast kernels switched in."""

    model: nn.Module
    fmt: ChatFormat
    lora: dict  # add_lora's adapter_config, trainable_params and trainable_share
    device: str  # what optimize_for_device switched, for the log


def lora_model(model_dir: Path, config: LoraConfig, num_layers: int) -> LoraModel:
    """Load a model variant, check it is supported, wrap its top ``num_layers`` blocks in LoRA, switch kernels."""
    model, tokenizer = load(str(model_dir))
    check_supported(model)
    fmt = ChatFormat(tokenizer)
    lora = add_lora(model, config, num_layers)
    return LoraModel(model, fmt, lora, optimize_for_device(model))


@dataclass(frozen=True)
class TrainPaths:
    """What the train stage reads and writes."""

    model_dir: Path
    data: Path  # the prepared splits: train.jsonl and valid.jsonl
    adapter: Path
    metrics: Path  # train.json
    log: Path  # DVCLive directory for the training curves
    checkpoints: Path  # outside the DVC cache; removed once the adapter is written


@dataclass(frozen=True)
class Cases:
    """The train and validation cases, tokenised, and the examples they come from."""

    train: list[TokenizedCase]
    valid: list[TokenizedCase]
    train_examples: list[Example]
    valid_examples: list[Example]


def read_cases(fmt: ChatFormat, data: Path, max_len: int) -> Cases:
    train_path, valid_path = (data / f"{name}.jsonl" for name in ("train", "valid"))
    train_examples, valid_examples = read_examples(train_path), read_examples(valid_path)
    return Cases(
        tokenize_split(fmt, train_examples, str(train_path), max_len),
        tokenize_split(fmt, valid_examples, str(valid_path), max_len),
        train_examples,
        valid_examples,
    )


def describe(config_name: str, config: LoraConfig, trainee: LoraModel) -> None:
    """Log how this process runs and what it trains."""
    lora = trainee.lora
    print(f"[train] {triage.RUNTIME}; {trainee.device}")
    print(
        f"[train] {config_name} ({config.kind}): rank {config.rank}, scale {config.scale}, "
        f"dropout {config.dropout}, lr {config.learning_rate}, batch {config.batch_size}, "
        f"{config.iters} iters; {lora['trainable_params']:,} trainable parameters "
        f"({lora['trainable_share']:.3%})"
    )


def summary(config_name: str, config: LoraConfig, label_weight: float, lora: dict, result: TrainResult) -> dict:
    """train.json: the config, the adapter's size and the run's metrics."""
    return {
        "config": config_name,
        "kind": config.kind,
        "loss": "cost_sensitive" if config.kind == "safety" else "cross_entropy",
        "label_weight": label_weight,
        **{k: getattr(config, k) for k in ("rank", "scale", "dropout", "learning_rate", "batch_size", "iters")},
        "trainable_params": lora["trainable_params"],
        "trainable_share": round(lora["trainable_share"], 6),
        **result.metrics,
    }


def train_adapter(params: Params, config_name: str, paths: TrainPaths) -> None:
    """Train the config's adapter on a quantized variant; write the adapter, train.json and the curves.

    Resumes from the checkpoints when re-run after a kill.
    """
    config, train = params.config(config_name), params.train
    mx.random.seed(train.seed)
    trainee = lora_model(paths.model_dir, config, train.num_layers)
    model, fmt = trainee.model, trainee.fmt
    cases = read_cases(fmt, paths.data, train.max_seq_length)
    describe(config_name, config, trainee)
    # Accuracy and ED AUROC at every validation, on the cases the validation batches hold,
    # and the accuracy on a fixed sample of the training cases.
    picked = validation_indices(cases.valid, config.batch_size, train.val_batches, train.seed)
    val_examples = [cases.valid_examples[i] for i in picked]
    fitted = train_sample(cases.train_examples, train.seed, train.fit_sample)
    run_id = fingerprint(asdict(config), asdict(train), tree_digest(paths.model_dir), tree_digest(paths.data))
    loss = objective(config, fmt.label_first_tokens, train.label_weight)

    def metrics(streams) -> dict:
        return task_metrics(model, fmt, val_examples, config.batch_size, streams) | {
            "train_accuracy": sample_accuracy(model, fmt, fitted, config.batch_size, streams)
        }

    result = run_training(
        model, cases.train, cases.valid, config, train, loss, paths.checkpoints, run_id, metrics, log_dir=paths.log
    )
    save_adapter(paths.adapter, model, trainee.lora["adapter_config"])
    write_json(paths.metrics, summary(config_name, config, train.label_weight, trainee.lora, result))
    shutil.rmtree(paths.checkpoints, ignore_errors=True)
