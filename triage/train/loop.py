"""LoRA training through mlx-lm's trainer, with resumable checkpoints and honest failure."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import get_total_parameters

from triage.config import LoraConfig, TrainParams
from triage.io import atomic_file, atomic_write_text, staged_directory, write_json
from triage.model.completion import plain_loss
from triage.model.device import cpu_streams
from triage.model.frozen import FrozenPrefix, record_frozen_prefix
from triage.model.lm import TokenizedCase
from triage.model.mlx_lm_internals import trainer_display_only_on_a_terminal
from triage.train.batches import make_iterate_batches, shared_length
from triage.train.log import TrainingLog
from triage.train.losses import Loss, sharded, split_cross_entropy

NEVER = 10**9  # an interval mlx-lm's trainer never reaches: we evaluate and save ourselves
VALIDATION_KEYS = ("val_loss", "val_label_loss", "val_reason_loss", "val_accuracy", "val_ed_auroc", "train_accuracy")
BEST_ADAPTER = "best_adapters.safetensors"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no adapter is written."""


class EarlyStop(Exception):
    """Raised from the callback: mlx-lm's trainer has no other way to end a run early."""


def improved(val_rows: list[dict], min_delta: float, key: str = "val_loss") -> bool:
    """Whether the newest validation's ``key`` beats every earlier one by more than ``min_delta``.

    Losses improve downwards, task metrics (accuracy, ED AUROC) upwards; a
    metric that could not be computed (None) never counts as an improvement.
    """
    sign = 1.0 if key.endswith("loss") else -1.0
    *earlier, newest = val_rows
    if newest.get(key) is None:
        return False
    values = [sign * r[key] for r in earlier if r.get(key) is not None]
    return not values or sign * newest[key] < min(values) - min_delta


def should_stop(val_rows: list[dict], patience: int, min_delta: float, key: str = "val_loss") -> bool:
    """True after ``patience`` validations in a row without an improvement (patience 0: never)."""
    if patience <= 0 or len(val_rows) <= patience:
        return False
    return not any(improved(val_rows[: i + 1], min_delta, key) for i in range(len(val_rows) - patience, len(val_rows)))


def learning_rate_schedule(peak: float, iters: int, warmup_ratio: float, kind: str):
    """Linear warmup from 0 over ``warmup_ratio * iters`` steps, then cosine decay to 0 (or constant)."""
    warmup = round(warmup_ratio * iters)
    # A constant rate is a step decay by a factor of 1: an mlx schedule, so it returns an array the
    # optimizer can cast and mlx-lm's compiled step can trace (a Python float or a captured array cannot).
    constant = optim.step_decay(peak, 1.0, max(iters, 1))
    after = optim.cosine_decay(peak, max(iters - warmup, 1), 0.0) if kind == "cosine" else constant
    if warmup == 0:
        return after
    return optim.join_schedules([optim.linear_schedule(0.0, peak, warmup), after], [warmup])


def add_lora(model: nn.Module, config: LoraConfig, num_layers: int) -> dict:
    """Freeze the base model and wrap its top ``num_layers`` blocks' linears in LoRA adapters."""
    model.freeze()
    lora_parameters = {"rank": config.rank, "scale": config.scale, "dropout": config.dropout}
    linear_to_lora_layers(model, num_layers, lora_parameters)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = get_total_parameters(model)  # counts quantized weights as the weights they encode
    return {
        "adapter_config": {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters},
        "trainable_params": int(trainable),
        "trainable_share": trainable / total,
    }


@dataclass
class Checkpoint:
    """Where a run resumes from: the step, its fingerprint and the curve rows so far."""

    step: int = 0
    fingerprint: str = ""
    train_rows: list[dict] = field(default_factory=list)
    val_rows: list[dict] = field(default_factory=list)


def fingerprint(*parts: object) -> str:
    """A short hash of everything that makes two runs the same run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tree_digest(path: Path) -> str:
    """sha256 over the names and bytes of every file below ``path``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def reseed_at(seed: int, step: int) -> None:
    """Restart the dropout RNG from (seed, step) at every checkpoint.

    MLX exposes no setter for its RNG key, so instead of saving the key an
    uninterrupted run reseeds here too, and a resumed run draws the same masks.
    """
    mx.random.seed(seed * 1_000_003 + step)


def save_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    """mx.save_safetensors through a temp file, so a kill never leaves half a file."""
    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), arrays)


def save_checkpoint(directory: Path, model: nn.Module, optimizer: optim.Optimizer, state: Checkpoint) -> None:
    """Adapter and optimizer state in one file, then the metadata; both atomic."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"adapter.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    arrays |= {f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)}
    save_arrays(directory / "state.safetensors", arrays)
    atomic_write_text(directory / "checkpoint.json", json.dumps(asdict(state)))


def load_checkpoint(directory: Path, expected: str, model: nn.Module, optimizer: optim.Optimizer) -> Checkpoint:
    """Restore a checkpoint of the same run, or return a fresh start."""
    meta = directory / "checkpoint.json"
    if not meta.exists():
        return Checkpoint(fingerprint=expected)
    state = Checkpoint(**json.loads(meta.read_text()))
    if state.fingerprint != expected:
        print(f"[train] ignoring checkpoint in {directory}: it belongs to different params or data")
        return Checkpoint(fingerprint=expected)
    arrays = mx.load(str(directory / "state.safetensors"))
    model.load_weights([(k[len("adapter.") :], v) for k, v in arrays.items() if k.startswith("adapter.")], strict=False)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(
        [(k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")]
    )
    print(f"[train] resuming from step {state.step} (checkpoint in {directory})")
    return state


class Monitor(TrainingCallback):
    """Logs progress, validates every ``steps_per_eval``, checkpoints, stops on NaN or early."""

    def __init__(
        self,
        model,
        optimizer,
        validate: Callable[[], dict],
        params: TrainParams,
        iters: int,
        checkpoint_dir: Path,
        state: Checkpoint,
        log: TrainingLog | None = None,
    ):
        self.model, self.optimizer, self.validate = model, optimizer, validate
        self.params, self.iters, self.checkpoint_dir, self.state = params, iters, checkpoint_dir, state
        self.log = log
        self.offset = state.step
        self.started = time.perf_counter()

    def on_train_loss_report(self, info: dict) -> None:
        step = self.offset + info["iteration"]
        loss = info["train_loss"]
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training loss became {loss} at step {step}; lower the learning rate, rank or scale. "
                "No adapter was written."
            )
        row = {
            "step": step,
            "train_loss": loss,
            "learning_rate": info["learning_rate"],
            "tokens_per_s": info["tokens_per_second"],
            "peak_memory_mb": info["peak_memory"] * 1e9 / 2**20,
        }
        self.state.train_rows.append(row)
        if self.log:
            self.log.train(row)
        validated = step % self.params.steps_per_eval == 0 or step == self.iters
        if validated:
            self._validate(step)
        self._log(row)
        if step % self.params.steps_per_save == 0 and step < self.iters:
            self.state.step = step
            save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.state)
            reseed_at(self.params.seed, step)
        if validated and should_stop(
            self.state.val_rows,
            self.params.early_stopping_patience,
            self.params.early_stopping_min_delta,
            self.params.select_on,
        ):
            raise EarlyStop(step)

    def _validate(self, step: int) -> None:
        self.state.val_rows.append({"step": step, **self.validate()})
        if self.log:
            self.log.validation(self.state.val_rows[-1])
        self.model.train()
        keep_best(self.model, self.params, self.state.val_rows, self.checkpoint_dir)

    def _log(self, row: dict) -> None:
        done = row["step"] - self.offset
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.iters - row["step"])
        val = self.state.val_rows[-1] if self.state.val_rows else None
        val_text = f" val {val['val_loss']:.4f}@{val['step']}{task_text(val)}" if val else ""
        print(
            f"[train] step {row['step']}/{self.iters} loss {row['train_loss']:.4f}{val_text} "
            f"lr {row['learning_rate']:.2e} {row['tokens_per_s']:.0f} tok/s ETA {eta / 60:.1f} min",
            flush=True,
        )


def keep_best(model: nn.Module, params: TrainParams, val_rows: list[dict], checkpoint_dir: Path) -> None:
    """With early stopping, save the adapter whenever the newest validation is the best so far (the first one is)."""
    if params.early_stopping_patience and improved(val_rows, params.early_stopping_min_delta, params.select_on):
        save_arrays(checkpoint_dir / BEST_ADAPTER, dict(tree_flatten(model.trainable_parameters())))


def task_text(row: dict) -> str:
    """' acc 0.550 auroc 0.712' for a validation row that has task metrics."""
    parts = [
        f" {short} {row[key]:.3f}"
        for key, short in (("val_accuracy", "acc"), ("val_ed_auroc", "auroc"))
        if row.get(key) is not None
    ]
    return "".join(parts)


@dataclass
class TrainResult:
    metrics: dict
    train_rows: list[dict]
    val_rows: list[dict]


def run_training(
    model: nn.Module,
    train_cases: list[TokenizedCase],
    val_cases: list[TokenizedCase],
    config: LoraConfig,
    params: TrainParams,
    loss: Loss,
    checkpoint_dir: Path,
    run_fingerprint: str,
    task_metrics: Callable[[list], dict] | None = None,
    log_dir: Path | None = None,
) -> TrainResult:
    """Train ``model`` (already wrapped with LoRA) for ``config.iters`` steps, resuming if possible.

    Every validation records the objective's loss, the cross-entropy of the
    label tokens and of the reason text apart, and ``task_metrics(streams)``
    (e.g. validation accuracy and ED AUROC from label scoring) when given;
    ``train.select_on`` picks which of them early stopping and the best
    adapter follow. With ``log_dir`` every train and validation row also goes to
    DVCLive there (:mod:`triage.train.log`).
    """
    if params.select_on != "val_loss" and task_metrics is None:
        raise ValueError(f"train.select_on {params.select_on} needs task metrics at every validation")
    streams = cpu_streams(params.cpu_streams)
    schedule = learning_rate_schedule(config.learning_rate, config.iters, params.warmup_ratio, params.schedule)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=params.weight_decay)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(checkpoint_dir, run_fingerprint, model, optimizer)
    if state.step:
        reseed_at(params.seed, state.step)
    args = TrainingArgs(
        batch_size=config.batch_size,
        iters=config.iters - state.step,
        val_batches=params.val_batches,
        steps_per_report=params.steps_per_report,
        steps_per_eval=NEVER,
        steps_per_save=NEVER,
        max_seq_length=params.max_seq_length,
        grad_checkpoint=params.grad_checkpoint,
        adapter_file=str(checkpoint_dir / "last_adapters.safetensors"),
    )
    validation_batches = make_iterate_batches(params.mask_prompt, params.seed, share_prefix=params.share_prompt_prefix)
    val_prefix = frozen_prefix(model, val_cases, params)

    def validation_loss(loss_fn: Loss = loss) -> float:
        return evaluate(
            model,
            val_cases,
            config.batch_size,
            params.val_batches,
            loss=sharded(loss_fn, streams, val_prefix),
            iterate_batches=validation_batches,
        )

    def validate() -> dict:
        label_sum, label_count, reason_sum, reason_count = split_validation_loss(
            model, val_cases, config.batch_size, params, validation_batches
        )
        row = {
            "val_loss": validation_loss(),
            "val_label_loss": label_sum / label_count,
            "val_reason_loss": reason_sum / reason_count if reason_count else None,
        }
        return row | (task_metrics(streams) if task_metrics else {})

    if not state.val_rows:
        state.val_rows.append({"step": 0, **validate()})
        keep_best(model, params, state.val_rows, checkpoint_dir)
        model.train()
    log = TrainingLog(log_dir, state.train_rows, state.val_rows) if log_dir else None
    monitor = Monitor(model, optimizer, validate, params, config.iters, checkpoint_dir, state, log)
    started = time.perf_counter()
    mx.reset_peak_memory()
    stopped_at = None
    try:
        if args.iters > 0:
            trainer_display_only_on_a_terminal()
            train(
                model,
                optimizer,
                train_cases,
                None,
                args,
                loss=training_loss(model, loss, train_cases, params),
                iterate_batches=make_iterate_batches(
                    params.mask_prompt, params.seed, skip=state.step, share_prefix=params.share_prompt_prefix
                ),
                training_callback=monitor,
            )
    except EarlyStop as stop:
        stopped_at = stop.args[0]
        model.load_weights(str(checkpoint_dir / BEST_ADAPTER), strict=False)
        print(
            f"[train] early stop at step {stopped_at}: no improvement in "
            f"{params.early_stopping_patience} validations; keeping the best adapter"
        )
    seconds = time.perf_counter() - started
    if log:
        log.close()
    rows, vals = state.train_rows, state.val_rows
    # The best validation is the last one that counted as an improvement: with early stopping
    # that is the adapter kept; with min_delta 0 it is the best value of train.select_on.
    improvements = [
        row for i, row in enumerate(vals) if improved(vals[: i + 1], params.early_stopping_min_delta, params.select_on)
    ]
    best = improvements[-1] if improvements else None
    final = vals[-1] if vals else {}
    metrics = {
        "final_train_loss": rows[-1]["train_loss"] if rows else None,
        **{f"final_{key}": final.get(key) for key in VALIDATION_KEYS},
        "selected_on": params.select_on,
        f"best_{params.select_on}": best[params.select_on] if best else None,
        "best_val_step": best["step"] if best else None,
        "val_cross_entropy": validation_loss(plain_loss),
        "seconds": round(seconds, 2),
        "resumed_from_step": monitor.offset,
        "early_stopped_at_step": stopped_at,
        "peak_memory_mb": round(mx.get_peak_memory() / 2**20, 1),
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in rows) / len(rows), 1) if rows else None,
    }
    return TrainResult(metrics, rows, vals)


def training_loss(model: nn.Module, loss: Loss, cases: list[TokenizedCase], params: TrainParams) -> Loss:
    """``loss`` as the trainer runs it on ``cases``: split over the CPU streams, the prefix's frozen blocks replayed."""
    return sharded(loss, cpu_streams(params.cpu_streams), frozen_prefix(model, cases, params))


def frozen_prefix(model: nn.Module, cases: list[TokenizedCase], params: TrainParams) -> FrozenPrefix | None:
    """What the frozen blocks make of the prompt prefix that the batches of ``cases`` share; None if they share none."""
    shared = shared_length(cases, params.mask_prompt, params.share_prompt_prefix)
    return record_frozen_prefix(model, cases[0].tokens[:shared]) if shared else None


def split_validation_loss(
    model: nn.Module, cases: list[TokenizedCase], batch_size: int, params: TrainParams, batches
) -> list[float]:
    """Summed cross-entropy and count of the label tokens, then of the reason text, over the validation batches."""
    model.eval()
    totals = mx.zeros(4)
    for index, batch in enumerate(batches(cases, batch_size, params.max_seq_length)):
        if 0 <= params.val_batches <= index:
            break
        totals = totals + split_cross_entropy(model, *batch)
    mx.eval(totals)
    return totals.tolist()


def save_adapter(directory: Path, model: nn.Module, adapter_config: dict) -> None:
    """Write adapters.safetensors and adapter_config.json as mlx-lm's load_adapters expects, as one directory."""
    with staged_directory(directory) as staged:
        staged.mkdir()
        mx.save_safetensors(str(staged / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        write_json(staged / "adapter_config.json", adapter_config)
