"""Evaluation on the tiny model: metrics keys, frozen ED threshold, MC dropout, extra sets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load
from scipy.special import softmax

from conftest import ROOT, SHARED_DATA, train_params
from triage.config import ExtraSet, LoraConfig, ParamsError, load_params
from triage.data.ktas import KTAS_TEXT_COLUMNS
from triage.data.synth import generate
from triage.evaluate.decisions import EdThreshold, freeze_ed_threshold
from triage.evaluate.evaluation import HEADLINE_FILE, ScoredSet, headline_file, read_extra_set, set_metrics
from triage.evaluate.language_model import evaluate_model, score_set
from triage.evaluate.mc_dropout import adapter_dropout, first_random_block, mc_dropout_votes, shared_lower_blocks
from triage.io import write_jsonl
from triage.model.completion import completion_loss
from triage.model.device import optimize_for_device
from triage.model.lm import ChatFormat, label_log_probs, tokenize_split
from triage.model.quantized import use_cpu_dequantized_matmul
from triage.model.scoring import label_log_likelihoods, label_probabilities
from triage.predict import RunPaths, export_run
from triage.schema import LABELS, DataError, Example, render_prompt
from triage.train.loop import add_lora, run_training, save_adapter
from triage.train.losses import plain_loss
from triage.weights.sources import quantize_model

EXPORT_TOLERANCE = 1e-3
"""The export's error as a share of the adapter's own effect (mean |change of a label log-likelihood|).

The adapted layers are exported in float. Re-quantized to the base's bits, as mlx-lm fuses by default,
the error was 0.012 of 0.89 nats at 8 bits and 0.42 of 0.70 at 4 bits on the tiny model, and the
fused 4-bit SmolLM2-135M answered like its base (93% argmax agreement) instead of like base + adapter (19%)."""
HEADLINE = ("accuracy", "macro_f1", "ed_recall", "ed_f2", "ed_fnr", "ed_fn", "safe", "test_loss")
RULES = ("argmax", "cost_aware", "ed_threshold")
MIX = {"ED": 0.3, "GP": 0.45, "HOME": 0.25}
SAMPLES = 20
TARGET = (0.96, "configs.balanced_safe.target_ed_recall")
# A KTAS-format export: door-side columns plus the expert's level, ';'-separated, decimal commas.
KTAS_ROWS = [
    ("2", "71", "3", "1", "right ocular pain", "1", "1", "2", "160", "100", "84", "18", "36,6", "100", "2"),
    ("1", "8", "1", "2", "fall from bicycle", "1", "1", "5", "100", "60", "110", "22", "36,9", "99", "4"),
    ("1", "45", "2", "1", "chest pain", "2", "1", "8", "90", "50", "130", "28", "37,2", "88", "1"),
    ("2", "30", "1", "1", "sore throat", "1", "0", "#BOŞ!", "120", "80", "76", "16", "37,8", "??", "5"),
    ("2", "82", "3", "1", "dizziness", "1", "0", "#BOŞ!", "140", "90", "66", "18", "36,5", "97", "4"),
    ("1", "15", "1", "2", "ankle sprain", "1", "1", "3", "110", "70", "80", "18", "36,7", "99", "5"),
]


def write_json_file(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def prompts_of(examples: list[Example]) -> list[str]:
    return [example.prompt for example in examples]


def write_ktas_csv(path: Path, rows: list[tuple[str, ...]] = KTAS_ROWS) -> Path:
    lines = [";".join((*KTAS_TEXT_COLUMNS, "KTAS_expert"))] + [";".join(row) for row in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode("cp1254"))
    return path


def write_adapter(directory: Path, model_dir: Path, dropout: float, num_layers: int = 1, b_scale: float = 1.0) -> Path:
    """A LoRA adapter on the top ``num_layers`` blocks with random (non-zero) lora_b, saved like train does."""
    model, _ = load(str(model_dir))
    config = LoraConfig(
        kind="standard", learning_rate=1.0e-5, batch_size=2, rank=8, scale=20.0, dropout=dropout, iters=1
    )
    lora = add_lora(model, config, num_layers)
    mx.random.seed(0)
    weights = [
        (k, b_scale * mx.random.normal(v.shape))
        for k, v in tree_flatten(model.trainable_parameters())
        if k.endswith("lora_b")
    ]
    model.update(tree_unflatten(weights))
    save_adapter(directory, model, lora["adapter_config"])
    return directory


def load_decisive(model_dir: Path, adapter: Path | None = None):
    """The tiny model (plus adapter) as the stage loads it, with its logits sharpened tenfold.

    Random weights give near-uniform next-token logits, so the two-token labels
    always lose to the one-token label; sharper logits let dropout flip answers.
    """
    model, tokenizer = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    model.model.norm.weight = model.model.norm.weight * 10.0
    use_cpu_dequantized_matmul(model)  # the fast CPU layers; numerically the native ones
    return model, ChatFormat(tokenizer)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir / "4bit"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    examples = generate(20, MIX, seed=5)
    directory = tmp_path_factory.mktemp("prepared")
    write_jsonl(directory / "valid.jsonl", [e.to_json() for e in examples[::2]])
    write_jsonl(directory / "test.jsonl", [e.to_json() for e in examples[1::2]])
    assert {e.label for e in examples[::2]} == set(LABELS) == {e.label for e in examples[1::2]}
    return directory


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_dir) -> dict[float, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {dropout: write_adapter(root / f"dropout-{dropout}", model_dir, dropout) for dropout in (0.0, 0.3)}


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    ktas = write_ktas_csv(tmp_path_factory.mktemp("raw") / "ktas.csv")
    evaluate = load_params(ROOT / "params.yaml").evaluate
    return replace(evaluate, mc_samples=SAMPLES, extra_sets=[ExtraSet(name="ktas", path=str(ktas), format="ktas")])


@pytest.fixture(scope="module")
def evaluation(model_dir, adapters, data_dir, params):
    """One evaluation with a dropout adapter, as the evaluate stage runs it."""
    model, fmt = load_decisive(model_dir, adapters[0.3])
    return evaluate_model(model, fmt, data_dir, params, 2048, TARGET, adapter_dropout(adapters[0.3]))


def test_metrics_json_has_every_key(evaluation, params):
    metrics = evaluation.metrics
    json.dumps(metrics, allow_nan=False)
    assert set(HEADLINE) <= set(metrics)
    assert metrics["decision"] == params.decision
    assert math.isclose(metrics["perplexity"], math.exp(metrics["test_loss"]))
    assert set(metrics["calibration"]) == {"ece", "brier"}
    assert set(metrics["gates"]) == {"ed_recall", "ed_f2", "ed_fnr"}
    for rule in RULES:
        assert set(HEADLINE) - {"test_loss"} <= set(metrics[rule]), rule
    assert metrics["ed_recall"] == metrics[params.decision]["ed_recall"]
    assert params.decision == "argmax"  # the model's own answer is the headline by default
    for key in ("ed_auroc", "ed_ap", "under_triage_rate", "over_triage_rate", "unsafe_rate"):
        assert isinstance(metrics[key], float), key
    assert set(metrics["ed_recall_at_budget"]) == {"non_ed_to_ed_20", "non_ed_to_ed_40"}
    ci = metrics["ci95"]
    assert "Clopper-Pearson" in ci["method"] and "bootstrap" in ci["method"]
    for key in ("ed_recall", "ed_fnr", "accuracy", "macro_f1", "ed_f2", "ed_auroc"):
        assert ci[key]["low"] <= ci[key]["high"], key
    assert ci["accuracy"]["low"] <= metrics["accuracy"] <= ci["accuracy"]["high"]
    assert metrics["ci95_clusters"] == len({row["group"] for row in evaluation.predictions})
    assert 0 < metrics["label_mass"]["p10"] <= metrics["label_mass"]["mean"] <= 1
    valid = metrics["valid"]
    assert set(HEADLINE) <= set(valid) and valid["n_cases"] == 10 and "mc_dropout" not in valid
    assert valid["ed_threshold"]["threshold"] == metrics["ed_threshold"]["threshold"]
    threshold = metrics["ed_threshold"]
    assert threshold["tuned_on"] == "valid" and 0.0 <= threshold["threshold"] <= 1.0
    assert (threshold["target_recall"], threshold["target_from"]) == TARGET
    for attr in ("age_band", "sex"):
        groups = metrics["subgroups"][attr]
        assert groups and all({"ed_recall", "over_triage_rate", "n"} <= set(g) for g in groups.values())
    mc = metrics["mc_dropout"]
    assert mc["applicable"] is True and mc["samples"] == SAMPLES and mc["dropout"] == 0.3
    assert {"mean_confidence", "mean_uncertainty", "n_flagged", "flagged_rate"} <= set(mc)


def test_predictions_have_the_required_fields(evaluation, data_dir, params):
    rows = evaluation.predictions
    test_ids = [json.loads(line)["id"] for line in (data_dir / "test.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == test_ids
    for row in rows:
        assert {"id", "label", "pred", "p_ED", "p_GP", "p_HOME", *RULES} <= set(row)
        assert row["pred"] == row[params.decision] and row["label"] in LABELS
        assert sum(row[f"p_{label}"] for label in LABELS) == pytest.approx(1.0, abs=1e-5)
        assert {"mc_vote", "mc_uncertainty", "age_band", "sex"} <= set(row)


def test_mc_dropout_votes_vary_and_the_uncertain_cases_go_to_review(evaluation, params):
    mc = evaluation.metrics["mc_dropout"]
    uncertainty = [row["mc_uncertainty"] for row in evaluation.predictions]
    assert mc["mean_uncertainty"] > 0 and max(uncertainty) > params.uncertainty_threshold
    assert mc["mean_confidence"] < 1.0
    flagged = {row["id"] for row in evaluation.predictions if row["mc_uncertainty"] > params.uncertainty_threshold}
    assert {row["id"] for row in evaluation.review} == flagged and mc["n_flagged"] == len(flagged)
    for row in evaluation.review:
        assert {"id", "label", "votes", "uncertainty"} <= set(row)
        assert sum(row["votes"].values()) == SAMPLES and max(row["votes"].values()) < SAMPLES


def test_a_trained_dropout_adapter_gives_mc_samples_that_differ(model_dir, tmp_path):
    """An adapter trained from lora_b = 0 for a few steps, not hand-randomised weights.

    Whether the argmax votes of a few cases split is chance (it passed on 8 cases, then failed after a
    change in summation order), so this reads the sampled label probabilities themselves: with
    lora_b still 0, or dropout off, every sample would be the same.
    """
    model, fmt = load_decisive(model_dir)
    config = LoraConfig(kind="standard", learning_rate=1.0e-2, batch_size=4, rank=8, scale=20.0, dropout=0.3, iters=10)
    add_lora(model, config, 2)
    examples = generate(24, MIX, seed=9)
    cases = tokenize_split(fmt, examples, "train.jsonl", 2048)
    params = train_params(
        num_layers=2,
        max_seq_length=2048,
        steps_per_report=5,
        steps_per_eval=10,
        steps_per_save=100,
        val_batches=1,
        cpu_streams=1,
    )
    run_training(model, cases, cases[:4], config, params, plain_loss, tmp_path / "checkpoints", "spread")
    model.train()  # LoRA dropout on, as MC sampling runs it
    mx.random.seed(7)
    samples = np.array(label_log_probs(model, fmt, examples[0].prompt, copies=SAMPLES))  # (samples, labels), nats
    assert np.ptp(samples, axis=0).max() > 0.01


def test_votes_are_cast_with_the_rule_given(model_dir, adapters, data_dir):
    model, fmt = load_decisive(model_dir, adapters[0.3])
    examples = [Example(**json.loads(line)) for line in (data_dir / "test.jsonl").read_text().splitlines()][:3]
    votes = mc_dropout_votes(model, fmt, prompts_of(examples), 4, seed=7, rule=lambda probs: ["HOME"] * len(probs))
    assert (votes == LABELS.index("HOME")).all()


def test_the_same_seed_draws_the_same_votes(model_dir, adapters, data_dir):
    model, fmt = load_decisive(model_dir, adapters[0.3])
    examples = [Example(**json.loads(line)) for line in (data_dir / "test.jsonl").read_text().splitlines()][:4]
    first = mc_dropout_votes(model, fmt, prompts_of(examples), SAMPLES, seed=7)
    again = mc_dropout_votes(model, fmt, prompts_of(examples), SAMPLES, seed=7)
    other = mc_dropout_votes(model, fmt, prompts_of(examples), SAMPLES, seed=8)
    assert first.shape == (4, SAMPLES)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_cases_on_two_cpu_streams_score_exactly_as_on_one(model_dir, adapters, data_dir):
    model, fmt = load_decisive(model_dir, adapters[0.3])
    examples = [Example(**json.loads(line)) for line in (data_dir / "test.jsonl").read_text().splitlines()][:5]
    streams = [mx.new_stream(mx.cpu) for _ in range(2)]
    np.testing.assert_array_equal(
        label_probabilities(model, fmt, prompts_of(examples), 2, streams),
        label_probabilities(model, fmt, prompts_of(examples), 2),
    )
    np.testing.assert_array_equal(
        mc_dropout_votes(model, fmt, prompts_of(examples), SAMPLES, 7, streams),
        mc_dropout_votes(model, fmt, prompts_of(examples), SAMPLES, 7),
    )
    cases = tokenize_split(fmt, examples, "test", 2048)
    assert completion_loss(model, cases, 2, streams) == completion_loss(model, cases, 2)


def test_shared_lower_blocks_give_the_plain_batch_result(model_dir, adapters):
    model, fmt = load_decisive(model_dir, adapters[0.3])
    prompt = render_prompt("Crushing chest pain for an hour, sweating and short of breath.")
    assert first_random_block(model) == 1  # LoRA (and so dropout) only on the top block of two
    model.train()
    mx.random.seed(3)
    plain = label_log_probs(model, fmt, prompt, copies=SAMPLES)
    mx.random.seed(3)
    with shared_lower_blocks(model, SAMPLES):
        shared = label_log_probs(model, fmt, prompt)  # one row in, SAMPLES rows out
    assert shared.shape == plain.shape == (SAMPLES, len(LABELS))
    assert len({tuple(np.round(np.array(row), 3)) for row in plain}) > 1  # dropout is really on
    np.testing.assert_allclose(np.array(shared), np.array(plain), atol=1e-3)
    assert type(model.model.layers[1]).__name__ == "TransformerBlock"  # the block is restored


def evaluate_without_extras(model_dir: Path, adapter: Path | None, data_dir: Path, params):
    model, fmt = load_decisive(model_dir, adapter)
    return evaluate_model(model, fmt, data_dir, replace(params, extra_sets=[]), 2048, TARGET, adapter_dropout(adapter))


@pytest.fixture(scope="module")
def baseline(model_dir, data_dir, params):
    """The zero-shot evaluation: no adapter, so no dropout."""
    return evaluate_without_extras(model_dir, None, data_dir, params)


def test_dropout_zero_and_the_baseline_report_not_applicable(model_dir, adapters, data_dir, params, baseline):
    for result in (evaluate_without_extras(model_dir, adapters[0.0], data_dir, params), baseline):
        mc = result.metrics["mc_dropout"]
        assert mc["applicable"] is False and mc["reason"] and set(mc) == {"applicable", "reason"}
        assert result.review == [] and "mc_vote" not in result.predictions[0]


def test_the_ed_threshold_is_tuned_on_the_validation_split_only(model_dir, data_dir, params, baseline, tmp_path):
    def threshold_with(valid: str, test: str) -> float:
        directory = tmp_path / f"{valid}-{test}"
        directory.mkdir()
        for name, source in (("valid", valid), ("test", test)):
            (directory / f"{name}.jsonl").write_text((data_dir / f"{source}.jsonl").read_text())
        return evaluate_without_extras(model_dir, None, directory, params).metrics["ed_threshold"]["threshold"]

    reference = baseline.metrics["ed_threshold"]["threshold"]
    assert threshold_with("valid", "valid") == reference  # other test cases, same threshold
    assert threshold_with("test", "test") != reference  # other validation cases move it


def test_a_validation_split_without_ed_cannot_drive_the_ed_threshold_rule(model_dir, data_dir, params, tmp_path):
    model, fmt = load_decisive(model_dir)
    rows = [json.loads(line) for line in (data_dir / "valid.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "valid.jsonl", [row for row in rows if row["label"] != "ED"])
    (tmp_path / "test.jsonl").write_text((data_dir / "test.jsonl").read_text())
    with pytest.raises(DataError, match="valid.jsonl.*no ED case"):
        evaluate_model(
            model, fmt, tmp_path, replace(params, decision="ed_threshold", extra_sets=[]), 2048, TARGET, None
        )


def synthetic_set(labels: list[str], probs: list[list[float]]) -> ScoredSet:
    examples = [
        Example(f"c{i}", render_prompt("x"), label, label, attrs={"age_band": "adult", "sex": "female"})
        for i, label in enumerate(labels)
    ]
    return ScoredSet(examples, np.array(probs), loss=0.5)


def test_a_class_missing_from_the_test_split_gives_none_and_na_gates(params):
    scored = synthetic_set(["GP", "HOME", "GP"], [[0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    threshold = EdThreshold(0.5, 0.95, "evaluate.ed_threshold_target", 10)
    metrics = set_metrics(scored, params, threshold)
    json.dumps(metrics, allow_nan=False)
    assert metrics["ed_recall"] is None and metrics["ed_fnr"] is None and metrics["safe"] is False
    # ED F2 stays defined (0) once a case is predicted ED; recall and FNR have no ED case to count.
    assert metrics["gates"]["ed_recall"]["state"] == metrics["gates"]["ed_fnr"]["state"] == "n/a"
    assert metrics["ci95"]["ed_recall"] == {"low": None, "high": None}
    assert metrics["gates_hold_at_pessimistic_end"]["ed_recall"] is None
    assert metrics["ed_auroc"] is None and metrics["ed_ap"] is None and metrics["ci95"]["ed_auroc"]["low"] is None
    assert metrics["subgroups"]["sex"]["female"]["ed_recall"] is None
    assert all(metrics[rule]["ed_recall"] is None for rule in RULES)


def test_ed_threshold_as_the_headline_rule_and_when_it_cannot_be_tuned(params):
    scored = synthetic_set(["ED", "GP", "HOME"], [[0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    threshold = freeze_ed_threshold(scored.examples, scored.probs, 0.95, "evaluate.ed_threshold_target")
    assert threshold.value == pytest.approx(0.3)  # the lowest p(ED) of a true ED case reaching the target
    metrics = set_metrics(scored, replace(params, decision="ed_threshold"), threshold)
    assert metrics["ed_recall"] == 1.0 and metrics["argmax"]["ed_recall"] == 0.0
    untuned = freeze_ed_threshold(scored.examples[1:], scored.probs[1:], 0.95, "evaluate.ed_threshold_target")
    block = set_metrics(scored, params, untuned)["ed_threshold"]
    assert block["applicable"] is False and "no ED case" in block["reason"] and block["threshold"] is None


def test_the_test_loss_counts_every_case(model_dir, data_dir):
    model, fmt = load_decisive(model_dir)
    examples = [Example(**json.loads(line)) for line in (data_dir / "test.jsonl").read_text().splitlines()][:5]
    cases = tokenize_split(fmt, examples, "test.jsonl", 2048)
    # Five cases in batches of four: a batcher that drops the remainder would differ from batches of one.
    assert completion_loss(model, cases, 4) == pytest.approx(completion_loss(model, cases, 1), rel=1e-4)
    assert completion_loss(model, cases, 4) != pytest.approx(completion_loss(model, cases[:4], 4), rel=1e-4)


def test_extra_sets_get_the_test_split_metrics(evaluation, params):
    extra = evaluation.metrics["extra_sets"]["ktas"]
    assert extra["n_cases"] == len(KTAS_ROWS) and extra["format"] == "ktas"
    assert set(HEADLINE) <= set(extra) and set(extra["gates"]) == {"ed_recall", "ed_f2", "ed_fnr"}
    assert set(extra["calibration"]) == {"ece", "brier"} and set(RULES) <= set(extra)
    # The same frozen threshold applies to every set.
    assert extra["ed_threshold"]["threshold"] == evaluation.metrics["ed_threshold"]["threshold"]
    assert set(extra["subgroups"]["age_band"]) == {"adult", "child", "elderly"}
    assert set(extra["subgroups"]["sex"]) == {"female", "male"}


@pytest.mark.skipif(not (SHARED_DATA / "ktas" / "data.csv").exists(), reason="KTAS data not present")
def test_the_real_ktas_file_as_an_extra_set(model_dir, params):
    model, fmt = load_decisive(model_dir)
    spec = ExtraSet(name="ktas", path=str(SHARED_DATA / "ktas" / "data.csv"), format="ktas", limit=24)
    examples = read_extra_set(spec)
    assert len(examples) == 24 and examples[0].id == "ktas-1"
    threshold = EdThreshold(0.4, 0.95, "evaluate.ed_threshold_target", 10)
    metrics = set_metrics(score_set(model, fmt, examples, spec.path, 2048, params.batch_size), params, threshold)
    assert metrics["n_cases"] == 24 and set(HEADLINE) <= set(metrics)
    assert {"age_band", "sex"} <= set(metrics["subgroups"])


def test_csv_extra_sets_map_labels_and_keep_attribute_columns(tmp_path):
    path = tmp_path / "clinic.csv"
    path.write_text("msg,urgency,age_band\nchest pain,emergent,adult\ncough,routine,child\n", encoding="utf-8")
    spec = ExtraSet(
        name="clinic",
        path=str(path),
        format="csv",
        text_field="msg",
        label_field="urgency",
        label_map={"emergent": "ED", "routine": "HOME"},
        attr_fields=["age_band"],
    )
    examples = read_extra_set(spec)
    assert [(e.label, e.attrs) for e in examples] == [("ED", {"age_band": "adult"}), ("HOME", {"age_band": "child"})]
    assert len(read_extra_set(replace(spec, limit=1))) == 1


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "x", "path": "a.csv", "format": "csv", "label_field": "y"}, "missing key.*text_field"),
        ({"name": "x", "path": "a.csv", "format": "ktas", "label_map": {"a": "ED"}}, "label_map.*only applies"),
        ({"name": "x y", "path": "a.jsonl", "format": "chat"}, "name"),
        ({"name": "x", "path": "a.jsonl", "format": "chat", "limit": 0}, "limit"),
    ],
)
def test_bad_extra_set_entries_are_named(tmp_path, entry, message):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["evaluate"]["extra_sets"] = [entry]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=message):
        load_params(tmp_path / "params.yaml")


def test_the_stage_writes_metrics_predictions_and_review(model_dir, adapters, data_dir, tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["evaluate"]["mc_samples"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "stages/evaluate.py"),
        "--run",
        "tiny-4bit-balanced_safe",
        "--config",
        "balanced_safe",
        "--model-dir",
        str(model_dir),
        "--adapter",
        str(adapters[0.3]),
        "--data",
        str(data_dir),
        "--metrics",
        str(out / "eval.json"),
        "--details",
        str(out / "evaluation.json"),
        "--training",
        str(write_json_file(tmp_path / "train.json", {"peak_memory_mb": 12.5})),
        "--predictions",
        str(out / "predictions.jsonl"),
        "--confusion",
        str(out / "confusion.csv"),
        "--review",
        str(out / "review.jsonl"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    compact, metrics = (json.loads((out / name).read_text()) for name in ("eval.json", "evaluation.json"))
    assert compact == headline_file(metrics, 12.5)
    assert set(compact) == {"decision", *HEADLINE_FILE, "ci95", "safe", "peak_memory_mb"} and compact["safe"] in (0, 1)
    assert metrics["run"] == "tiny-4bit-balanced_safe" and metrics["adapter"] is True
    assert metrics["ed_threshold"]["target_from"] == "configs.balanced_safe.target_ed_recall"
    assert metrics["mc_dropout"]["samples"] == 4 and (out / "review.jsonl").is_file()
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 10
    confusion = (out / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "id,label,pred"
    assert confusion[1:] == [f"{p['id']},{p['label']},{p['pred']}" for p in predictions]


@pytest.mark.parametrize("bits", [8, 4])
def test_export_answers_like_base_plus_adapter_not_like_the_base(tiny_model_dir, data_dir, tmp_path, bits):
    """mlx-lm users report fused models that answer like the base model (mlx-lm issue 1172)."""
    model_dir = tmp_path / f"{bits}bit"
    quantize_model(tiny_model_dir / "float", model_dir, bits=bits, group_size=64)
    # lora_b of the size a short training run reaches: the adapter moves the label log-likelihoods by ~1 nat.
    mx.random.seed(11)  # lora_a is drawn before write_adapter seeds lora_b: fix it, whatever ran before
    adapter = write_adapter(tmp_path / "adapter", model_dir, dropout=0.0, num_layers=2, b_scale=0.01)
    prompts = prompts_of([Example(**json.loads(line)) for line in (data_dir / "test.jsonl").read_text().splitlines()])
    check = export_run(
        RunPaths("tiny-4bit-x", model_dir, adapter, tmp_path / "eval.json"), tmp_path / "exported", prompts, 4
    )

    def log_likelihoods(directory, adapter_dir=None):
        model, tokenizer = load(str(directory), adapter_path=str(adapter_dir) if adapter_dir else None)
        optimize_for_device(model, inference=True)
        return label_log_likelihoods(model, ChatFormat(tokenizer), prompts, 4)

    base, adapted, exported = (
        log_likelihoods(model_dir),
        log_likelihoods(model_dir, adapter),
        log_likelihoods(tmp_path / "exported"),
    )
    adapter_effect, export_error = np.abs(adapted - base).mean(), np.abs(exported - adapted).mean()
    assert export_error < EXPORT_TOLERANCE * adapter_effect, (export_error, adapter_effect)
    assert np.abs(exported - base).mean() > 0.5 * adapter_effect  # not the base model
    probs = softmax(adapted, axis=1), softmax(exported, axis=1)
    assert check.cases == len(prompts) and check.max_abs_diff == pytest.approx(
        np.abs(probs[1] - probs[0]).max(), abs=1e-5
    )
    assert check.agreement == np.mean(probs[0].argmax(axis=1) == probs[1].argmax(axis=1)) == 1.0
