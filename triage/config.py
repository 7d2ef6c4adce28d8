"""params.yaml, validated into dataclasses that reject unknown, missing or mistyped keys."""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from triage.schema import LABELS

CostMatrix = dict[str, dict[str, float]]


class ParamsError(ValueError):
    """A params.yaml problem; the message names the file and the dotted key."""


@dataclass(frozen=True)
class RunSelection:
    models: list[str]
    bits: list[str]
    configs: list[str]


@dataclass(frozen=True)
class TableParams:
    format: Literal["csv", "jsonl"]
    text_field: str
    label_field: str
    label_map: dict[str, str]
    encoding: str


@dataclass(frozen=True)
class ConditionParams:
    held_out_share: float
    wording: dict[str, int]
    complaint: dict[str, int]


@dataclass(frozen=True)
class DataParams:
    source: Literal["builtin", "prompt_completion", "chat", "table", "ktas"]
    path: str | None
    n_examples: int
    label_mix: dict[str, float]
    splits: dict[str, float]
    seed: int
    conditions: ConditionParams
    table: TableParams


@dataclass(frozen=True)
class ModelSource:
    source: str
    upstream: str | None = None


@dataclass(frozen=True)
class QuantizeParams:
    group_size: int


@dataclass(frozen=True)
class TrainParams:
    weight_decay: float
    warmup_ratio: float
    schedule: Literal["cosine", "constant"]
    num_layers: int
    max_seq_length: int
    seed: int
    steps_per_report: int
    steps_per_eval: int
    steps_per_save: int
    val_batches: int
    fit_sample: int
    grad_checkpoint: bool
    mask_prompt: bool
    early_stopping_patience: int
    early_stopping_min_delta: float
    select_on: Literal["val_loss", "val_accuracy", "val_ed_auroc"]
    label_weight: float
    cpu_streams: int
    share_prompt_prefix: bool


@dataclass(frozen=True)
class LoraOverrides:
    rank: int | None
    scale: float | None
    dropout: float | None
    learning_rate: float | None
    batch_size: int | None
    iters: int | None


@dataclass(frozen=True)
class LoraConfig:
    kind: Literal["standard", "safety"]
    learning_rate: float
    batch_size: int
    rank: int
    scale: float
    dropout: float
    iters: int
    target_ed_recall: float | None = None
    class_weights: dict[str, float] | None = None
    cost_matrix: CostMatrix | None = None


@dataclass(frozen=True)
class Gates:
    ed_recall_min: float
    ed_f2_min: float
    ed_fnr_max: float


@dataclass(frozen=True)
class ExtraSet:
    """An external labelled set scored like the test split; see params.yaml `evaluate.extra_sets`."""

    name: str
    path: str
    format: Literal["jsonl", "csv", "prompt_completion", "chat", "ktas"]
    text_field: str | None = None
    label_field: str | None = None
    label_map: dict[str, str] | None = None
    id_field: str | None = None
    attr_fields: list[str] | None = None
    delimiter: str | None = None
    encoding: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class EvaluateParams:
    decision: Literal["argmax", "cost_aware", "ed_threshold"]
    cost_matrix: CostMatrix
    gates: Gates
    batch_size: int
    ed_threshold_target: float
    mc_samples: int
    uncertainty_threshold: float
    seed: int
    over_triage_budgets: list[float]
    extra_sets: list[ExtraSet]


@dataclass(frozen=True)
class ClassicalParams:
    max_ngram: int
    min_df: int
    inverse_regularisation: float
    class_weight: Literal["balanced"] | None


@dataclass(frozen=True)
class ProbeParams:
    inverse_regularisation: list[float]
    class_weight: Literal["balanced"] | None


@dataclass(frozen=True)
class Params:
    run: RunSelection
    data: DataParams
    models: dict[str, ModelSource]
    quantize: QuantizeParams
    train: TrainParams
    lora: LoraOverrides
    configs: dict[str, LoraConfig]
    evaluate: EvaluateParams
    classical: ClassicalParams
    probe: ProbeParams

    def config(self, name: str) -> LoraConfig:
        """The named config with the non-null `lora:` overrides applied."""
        if name not in self.configs:
            raise ParamsError(f"unknown config '{name}'; known: {', '.join(self.configs)}")
        overrides = {k: v for k, v in vars(self.lora).items() if v is not None}
        return replace(self.configs[name], **overrides)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError naming the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ParamsError(f"{path}: cannot read params: {exc}") from exc
    try:
        params = _build(Params, raw, "")
        _check_semantics(params)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    return params


def _build(kind: Any, value: Any, key: str) -> Any:
    """Convert ``value`` to the annotated ``kind``, naming ``key`` on any mismatch."""
    origin = typing.get_origin(kind)
    if is_dataclass(kind):
        return _build_dataclass(kind, value, key)
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _build(inner, value, key)
    if origin is Literal:
        if value not in typing.get_args(kind):
            allowed = ", ".join(map(str, typing.get_args(kind)))
            raise ParamsError(f"'{key}' is {value!r}; expected one of: {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"'{key}' must be a list, got {_describe(value)}")
        (inner,) = typing.get_args(kind)
        return [_build(inner, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"'{key}' must be a mapping, got {_describe(value)}")
        _, inner = typing.get_args(kind)
        return {str(k): _build(inner, v, f"{key}.{k}") for k, v in value.items()}
    return _build_scalar(kind, value, key)


def _build_dataclass(kind: Any, value: Any, key: str) -> Any:
    if not isinstance(value, dict):
        raise ParamsError(f"'{key or 'params'}' must be a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(kind)
    names = [f.name for f in fields(kind)]
    unknown = sorted(set(map(str, value)) - set(names))
    if unknown:
        raise ParamsError(f"unknown key '{_join(key, unknown[0])}'; allowed here: {', '.join(names)}")
    missing = [
        f.name for f in fields(kind) if f.name not in value and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ParamsError(f"missing key '{_join(key, missing[0])}'")
    built = {name: _build(hints[name], value[name], _join(key, name)) for name in names if name in value}
    return kind(**built)


def _build_scalar(kind: Any, value: Any, key: str) -> Any:
    # bool is an int subclass in Python, so `rank: true` must be refused explicitly.
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        hint = " (write floats as 3.0e-5: YAML reads 3e-5 as text)" if isinstance(value, str) else ""
        raise ParamsError(f"'{key}' must be {kind.__name__}, got {_describe(value)}{hint}")
    return value


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


BITS_PATTERN = re.compile(r"^(2|3|4|5|6|8)bit$")
MODEL_SOURCE = re.compile(
    r"^(builtin:tiny(-gemma3)?|hub:[\w.-]+/[\w.-]+|dir:.+|gguf:.+\.gguf|gguf-package:[\w.-]+/[\w.-]+\.gguf)$"
)


def bits_of(variant_bits: str) -> int:
    """4 for "4bit"."""
    match = BITS_PATTERN.match(variant_bits)
    if not match:
        raise ParamsError(f"bit width '{variant_bits}' must look like 4bit or 8bit (2-6 or 8)")
    return int(match.group(1))


def _check_semantics(params: Params) -> None:
    for field_name, known in (("models", params.models), ("configs", params.configs)):
        for i, name in enumerate(getattr(params.run, field_name)):
            if name not in known:
                raise ParamsError(
                    f"'run.{field_name}[{i}]' is '{name}', which is not in '{field_name}:' (known: {', '.join(known)})"
                )
    for i, bits in enumerate(params.run.bits):
        try:
            bits_of(bits)
        except ParamsError as exc:
            raise ParamsError(f"'run.bits[{i}]': {exc}") from None
    for name, model in params.models.items():
        if not MODEL_SOURCE.match(model.source):
            raise ParamsError(
                f"'models.{name}.source' is '{model.source}'; expected builtin:tiny, builtin:tiny-gemma3, "
                "hub:<org>/<name>, dir:<path>, gguf:<file.gguf> or gguf-package:<package>/<file.gguf>"
            )
    _check_data(params.data)
    _check_fraction_map("data.label_mix", params.data.label_mix, LABELS)
    _check_fraction_map("data.splits", params.data.splits, ("train", "valid", "test"))
    for name, config in params.configs.items():
        _check_config(f"configs.{name}", config)
    if not params.configs:
        raise ParamsError("'configs' must define at least one LoRA config")
    _check_config("lora overrides applied to configs", params.config(next(iter(params.configs))))
    _check_evaluate(params.evaluate)
    _check_classical(params.classical)
    _check_probe(params.probe)
    if not params.train.label_weight > 0:
        raise ParamsError("'train.label_weight' must be positive (1 = every completion token counts once)")
    if not 0.0 <= params.train.warmup_ratio < 1.0:
        raise ParamsError("'train.warmup_ratio' must be in [0, 1)")
    for key in ("steps_per_report", "steps_per_eval", "steps_per_save", "max_seq_length", "cpu_streams", "fit_sample"):
        if getattr(params.train, key) < 1:
            raise ParamsError(f"'train.{key}' must be at least 1")
    # Validation and checkpoints happen at report steps, where mlx-lm hands us control.
    for key in ("steps_per_eval", "steps_per_save"):
        if getattr(params.train, key) % params.train.steps_per_report:
            raise ParamsError(f"'train.{key}' must be a multiple of 'train.steps_per_report'")
    if any(c.kind == "safety" for c in params.configs.values()) and not params.train.mask_prompt:
        raise ParamsError("'train.mask_prompt' must be true: the safety loss reads the first completion token")


def _check_probe(probe: ProbeParams) -> None:
    if not probe.inverse_regularisation or any(not c > 0 for c in probe.inverse_regularisation):
        raise ParamsError("'probe.inverse_regularisation' must list at least one positive value")


def _check_classical(classical: ClassicalParams) -> None:
    for key in ("max_ngram", "min_df"):
        if getattr(classical, key) < 1:
            raise ParamsError(f"'classical.{key}' must be at least 1")
    if not classical.inverse_regularisation > 0:
        raise ParamsError("'classical.inverse_regularisation' must be positive")


def _check_data(data: DataParams) -> None:
    if data.source != "builtin" and not data.path:
        raise ParamsError(f"'data.path' is required when data.source is '{data.source}'")
    if data.n_examples < 30:
        raise ParamsError("'data.n_examples' must be at least 30 so every split holds every label")
    if not 0.0 < data.conditions.held_out_share < 0.5:
        raise ParamsError("'data.conditions.held_out_share' must be above 0 and below 0.5")
    for condition in ("wording", "complaint"):
        sizes = getattr(data.conditions, condition)
        if set(sizes) != {"valid", "test"}:
            raise ParamsError(f"'data.conditions.{condition}' must have exactly the keys valid, test")
        for part, n in sizes.items():
            if n < 10:
                raise ParamsError(f"'data.conditions.{condition}.{part}' must be at least 10 so it holds every label")


def _check_fraction_map(key: str, values: dict[str, float], expected: tuple[str, ...]) -> None:
    if set(values) != set(expected):
        raise ParamsError(f"'{key}' must have exactly the keys {', '.join(expected)}")
    if any(v <= 0 for v in values.values()) or abs(sum(values.values()) - 1.0) > 1e-6:
        raise ParamsError(f"'{key}' values must be positive and sum to 1, got {values}")


def _check_config(key: str, config: LoraConfig) -> None:
    positive = {
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "rank": config.rank,
        "scale": config.scale,
        "iters": config.iters,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ParamsError(f"'{key}.{name}' must be positive, got {value}")
    if not 0.0 <= config.dropout < 1.0:
        raise ParamsError(f"'{key}.dropout' must be in [0, 1), got {config.dropout}")
    safety_keys = ("target_ed_recall", "class_weights", "cost_matrix")
    if config.kind == "safety":
        for name in safety_keys:
            if getattr(config, name) is None:
                raise ParamsError(f"missing key '{key}.{name}' (required for kind: safety)")
        _check_cost_matrix(f"{key}.cost_matrix", config.cost_matrix)
        if set(config.class_weights) != set(LABELS) or min(config.class_weights.values()) <= 0:
            raise ParamsError(f"'{key}.class_weights' needs a positive weight for each of {LABELS}")
    else:
        for name in safety_keys:
            if getattr(config, name) is not None:
                raise ParamsError(f"'{key}.{name}' only applies to kind: safety")


EXTRA_SET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
TABLE_ONLY_KEYS = ("text_field", "label_field", "label_map", "id_field", "attr_fields", "delimiter")


def _check_evaluate(evaluate: EvaluateParams) -> None:
    _check_cost_matrix("evaluate.cost_matrix", evaluate.cost_matrix)
    if evaluate.batch_size < 1:
        raise ParamsError("'evaluate.batch_size' must be at least 1")
    if evaluate.mc_samples < 2:
        raise ParamsError("'evaluate.mc_samples' must be at least 2: one sample cannot disagree with itself")
    if not 0.0 < evaluate.ed_threshold_target <= 1.0:
        raise ParamsError("'evaluate.ed_threshold_target' must be in (0, 1]")
    if evaluate.uncertainty_threshold < 0:
        raise ParamsError("'evaluate.uncertainty_threshold' must be >= 0 (vote entropy in nats)")
    if not evaluate.over_triage_budgets or not all(0 < b < 1 for b in evaluate.over_triage_budgets):
        raise ParamsError("'evaluate.over_triage_budgets' must list shares in (0, 1), e.g. [0.2, 0.4]")
    names = [extra.name for extra in evaluate.extra_sets]
    for i, extra in enumerate(evaluate.extra_sets):
        key = f"evaluate.extra_sets[{i}]"
        # The name becomes a key in the metrics JSON, which `dvc metrics show` addresses by it.
        if not EXTRA_SET_NAME.match(extra.name) or names.count(extra.name) > 1:
            raise ParamsError(f"'{key}.name' {extra.name!r} must be unique and use only letters, digits, _ and -")
        _check_extra_set(key, extra)


def _check_extra_set(key: str, extra: ExtraSet) -> None:
    """Column settings belong to the csv/jsonl tables; the other formats have fixed fields."""
    table = extra.format in ("csv", "jsonl")
    for name in TABLE_ONLY_KEYS:
        if not table and getattr(extra, name) is not None:
            raise ParamsError(f"'{key}.{name}' only applies to format csv or jsonl")
    for name in ("text_field", "label_field"):
        if table and getattr(extra, name) is None:
            raise ParamsError(f"missing key '{key}.{name}' (required for format {extra.format})")
    if extra.delimiter is not None and extra.format != "csv":
        raise ParamsError(f"'{key}.delimiter' only applies to format csv")
    if extra.limit is not None and extra.limit < 1:
        raise ParamsError(f"'{key}.limit' must be at least 1, or null for every case")


def _check_cost_matrix(key: str, matrix: CostMatrix) -> None:
    if set(matrix) != set(LABELS) or any(set(row) != set(LABELS) for row in matrix.values()):
        raise ParamsError(f"'{key}' must be a {len(LABELS)}x{len(LABELS)} mapping over {LABELS}")
    for true in LABELS:
        if matrix[true][true] != 0.0 or min(matrix[true].values()) < 0:
            raise ParamsError(f"'{key}.{true}': a correct answer costs 0 and no cost is negative")
