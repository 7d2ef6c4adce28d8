"""Training does what params.yaml says: the loss, the schedule, checkpoints and resume."""

from __future__ import annotations

import math
import random
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from conftest import train_params
from triage.config import LoraConfig
from triage.model.completion import collate, plain_loss
from triage.model.lm import ChatFormat, TokenizedCase
from triage.schema import LABELS, Example
from triage.train.loop import TrainingDiverged, add_lora, learning_rate_schedule, run_training, should_stop
from triage.train.losses import complement_log_probs, make_safety_loss, safety_objective, sharded
from triage.train.validation import train_sample

WEIGHTS = {"ED": 5.0, "GP": 2.0, "HOME": 1.0}
COST = {
    "ED": {"ED": 0.0, "GP": 100.0, "HOME": 100.0},
    "GP": {"ED": 2.0, "GP": 0.0, "HOME": 1.0},
    "HOME": {"ED": 2.0, "GP": 1.0, "HOME": 0.0},
}
VOCAB = 16
FIRST = [3, 7, 11]  # the label options' first tokens in the synthetic vocabulary


def one_token_batch(label: str, answer: str, confidence: float = 8.0):
    """Logits for a one-token completion whose label position strongly favours ``answer``."""
    logits = np.zeros((1, 1, VOCAB), np.float32)
    logits[0, 0, FIRST[LABELS.index(answer)]] = confidence
    tokens = mx.array([[0, FIRST[LABELS.index(label)]]])
    return mx.array(logits), tokens, mx.array([LABELS.index(label)]), mx.array([[0]]), mx.array([[1.0]])


def logit_grads(label: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
    logits, tokens, labels, positions, mask = one_token_batch(label, answer)
    weights = mx.array([WEIGHTS[label] for label in LABELS])
    cost = mx.array([[COST[t][p] for p in LABELS] for t in LABELS])

    def plain(z):
        return nn.losses.cross_entropy(z[:, 0, :], tokens[:, 1]).sum()

    def safety(z):
        return safety_objective(z, tokens, labels, positions, mask, mx.array(FIRST), weights, cost)

    return np.array(mx.grad(safety)(logits))[0, 0], np.array(mx.grad(plain)(logits))[0, 0]


def norm_ratio(label: str, answer: str) -> float:
    safety, plain = logit_grads(label, answer)
    return float(np.linalg.norm(safety) / np.linalg.norm(plain))


def wrong_answer_ratio(label: str, answer: str) -> float:
    """How much harder the loss pushes down the logit of the (wrong) answer given."""
    safety, plain = logit_grads(label, answer)
    k = FIRST[LABELS.index(answer)]
    return float(safety[k] / plain[k])


def test_an_ed_case_answered_home_pushes_about_100_times_harder():
    assert wrong_answer_ratio("ED", "HOME") == pytest.approx(WEIGHTS["ED"] + COST["ED"]["HOME"], rel=0.02)
    assert 80 < norm_ratio("ED", "HOME") < 110


def test_a_confident_correct_answer_gets_almost_no_push():
    for label in LABELS:
        correct = np.linalg.norm(logit_grads(label, label)[0])
        missed = max(np.linalg.norm(logit_grads(label, other)[0]) for other in LABELS if other != label)
        assert correct < 0.01 * missed


def test_without_costs_the_safety_loss_is_class_weighted_cross_entropy(monkeypatch):
    monkeypatch.setitem(COST, "ED", {"ED": 0.0, "GP": 0.0, "HOME": 0.0})
    monkeypatch.setitem(COST, "GP", {"ED": 0.0, "GP": 0.0, "HOME": 0.0})
    monkeypatch.setitem(COST, "HOME", {"ED": 0.0, "GP": 0.0, "HOME": 0.0})
    for label in LABELS:
        for answer in LABELS:
            assert norm_ratio(label, answer) == pytest.approx(WEIGHTS[label], rel=1e-4)


def test_over_triage_and_gp_home_swaps_cost_what_the_matrix_says():
    assert wrong_answer_ratio("GP", "ED") == pytest.approx(WEIGHTS["GP"] + COST["GP"]["ED"], rel=0.02)
    assert wrong_answer_ratio("HOME", "ED") == pytest.approx(WEIGHTS["HOME"] + COST["HOME"]["ED"], rel=0.02)
    assert wrong_answer_ratio("GP", "HOME") == pytest.approx(WEIGHTS["GP"] + COST["GP"]["HOME"], rel=0.02)


def test_complement_log_probs_are_exact_and_finite_when_certain():
    z = mx.array([[0.3, -1.2, 2.0], [60.0, 0.0, 0.0]])
    p = np.array(mx.softmax(z, axis=-1))
    got = np.array(complement_log_probs(z))
    assert np.allclose(got[0], np.log(1 - p[0]), atol=1e-5)
    assert np.isfinite(got).all() and got[1, 0] < -50


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir / "4bit")


def short_cases(fmt: ChatFormat, n: int, ed_share: float, seed: int) -> list[TokenizedCase]:
    """Short messages whose label follows from one keyword, so a tiny model can learn them."""
    words = {"ED": ["chest", "stroke", "bleed"], "GP": ["cough", "rash", "knee"], "HOME": ["cold", "cut", "bump"]}
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        label = "ED" if rng.random() < ed_share else rng.choice(["GP", "HOME"])
        prompt = f"{rng.choice(words[label])} {rng.choice(['today', 'now', 'again'])}"
        cases.append(fmt.case(Example(str(i), prompt, label, label)))
    return cases


def lora_config(**changes) -> LoraConfig:
    base = dict(kind="standard", learning_rate=1e-3, batch_size=4, rank=4, scale=10.0, dropout=0.0, iters=20)
    return LoraConfig(**{**base, **changes})


def fresh(path: str, config: LoraConfig):
    mx.random.seed(42)
    model, tokenizer = load(path)
    add_lora(model, config, 16)
    return model, ChatFormat(tokenizer)


def test_safety_loss_on_a_real_model_is_plain_ce_times_weight_plus_cost(tiny):
    model, fmt = fresh(tiny, lora_config())
    case = fmt.case(Example("x", "chest pain", "ED - go now", "ED"))
    batch = collate([case], mask_prompt=True)
    safety = make_safety_loss(fmt.label_first_tokens, WEIGHTS, COST)
    loss_s, ntoks = safety(model, *batch)
    loss_p, _ = plain_loss(model, *batch)
    from triage.model.completion import completion_logits

    z = completion_logits(model, batch[0], batch[2])[:, 0, :][:, mx.array(fmt.label_first_tokens)]
    cost_term = -(mx.array([0.0, 100.0, 100.0]) * complement_log_probs(z)[0]).sum()
    assert float(loss_s) == pytest.approx(float(5 * loss_p + cost_term / ntoks), rel=1e-4)


def test_training_the_cost_term_and_scoring_read_the_same_label_tokens(tiny):
    model, fmt = fresh(tiny, lora_config())
    for label, completion in (("ED", "ED - go now"), ("GP", "GP"), ("HOME", "HOME. Rest and fluids")):
        case = fmt.case(Example("x", "chest pain", completion, label))
        scored = fmt.label_tokens[LABELS.index(label)]
        # Cross-entropy's targets after the prompt are the scored label tokens, and the cost
        # term's option of this label is their first token.
        assert case.tokens[case.prompt_length : case.prompt_length + len(scored)] == scored
        assert fmt.label_first_tokens[LABELS.index(label)] == scored[0]
        _, _, positions, mask, _, _ = collate([case], mask_prompt=True)
        assert case.tokens[int(positions[0, 0]) + 1] == scored[0]


class MergingTokenizer:
    """Greedy longest-match over a vocabulary where "ED -" is one token, as BPE merges can make it."""

    VOCAB = ("ED -", "ED", "GP", "HOME", " now")
    chat_template = None
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        while text:
            match = next((word for word in self.VOCAB if text.startswith(word)), text[0])
            ids.append(1 + self.VOCAB.index(match) if match in self.VOCAB else 100 + ord(match))
            text = text[len(match) :]
        return ids


def test_the_label_tokens_do_not_depend_on_what_follows_the_label():
    fmt = ChatFormat(MergingTokenizer())
    assert MergingTokenizer().encode("ED - now")[0] != fmt.label_tokens[0][0]  # the trap
    case = fmt.case(Example("x", "chest pain", "ED - now", "ED"))
    assert case.tokens[case.prompt_length] == fmt.label_first_tokens[0] == MergingTokenizer().encode("ED")[0]


def test_a_completion_not_starting_with_its_label_is_refused_with_file_and_line(tiny):
    from triage.model.lm import tokenize_split
    from triage.schema import DataError

    _, fmt = fresh(tiny, lora_config())
    examples = [Example("a", "chest pain", "ED - now", "ED"), Example("b", "chest pain", " ED - now", "ED")]
    with pytest.raises(DataError, match=r"train\.jsonl:2: field 'completion': .*start with its label 'ED'"):
        tokenize_split(fmt, examples, "train.jsonl", 512)


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_loss_and_gradients_equal_the_whole_batch(tiny, shards):
    """Row shards on separate CPU streams: same value, same gradients, plain and safety loss."""
    model, fmt = fresh(tiny, lora_config(dropout=0.0))
    cases = [
        fmt.case(Example(str(i), text, completion, completion.split()[0]))
        for i, (text, completion) in enumerate(
            [
                ("chest pain", "ED - now"),
                ("a cough for a week", "GP"),
                ("sore throat", "HOME - rest"),
                ("I fainted", "ED"),
                ("rash", "GP - soon"),
            ]
        )
    ]
    batch = collate(cases, mask_prompt=True)
    streams = [mx.new_stream(mx.cpu) for _ in range(shards)]
    for loss in (plain_loss, make_safety_loss(fmt.label_first_tokens, WEIGHTS, COST)):
        (whole, n_whole), grads_whole = nn.value_and_grad(model, loss)(model, *batch)
        (split, n_split), grads_split = nn.value_and_grad(model, sharded(loss, streams))(model, *batch)
        assert int(n_split) == int(n_whole) and float(split) == pytest.approx(float(whole), rel=1e-5)
        for (name, a), (_, b) in zip(tree_flatten(grads_whole), tree_flatten(grads_split)):
            # fp32 sums in another order: an element near 0 may move by ~1e-6 of the tensor's largest one.
            scale = float(np.abs(np.array(a)).max())
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-3, atol=1e-6 * max(scale, 1.0), err_msg=name)


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    peak, iters = 1e-4, 1000
    schedule = learning_rate_schedule(peak, iters, 0.1, "cosine")
    warmup = 100
    assert float(schedule(0)) == 0.0
    assert float(schedule(warmup // 2)) == pytest.approx(peak / 2, rel=1e-5)
    assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-5)
    mid = 500
    expected_mid = peak * 0.5 * (1 + math.cos(math.pi * (mid - warmup) / (iters - warmup)))
    assert float(schedule(mid)) == pytest.approx(expected_mid, rel=1e-4)
    assert float(schedule(iters)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.5])
def test_a_constant_schedule_holds_the_peak_and_drives_adamw(warmup_ratio):
    schedule = learning_rate_schedule(1e-3, 4, warmup_ratio, "constant")
    assert float(schedule(3)) == pytest.approx(1e-3, rel=1e-6)
    optimizer = optim.AdamW(learning_rate=schedule)
    weights = {"w": mx.ones((3,))}
    for _ in range(4):
        weights = optimizer.apply_gradients({"w": mx.ones((3,))}, weights)
    assert float(weights["w"][0]) < 1.0


def adapter_arrays(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


class Interrupt(Exception):
    pass


def test_resume_after_interruption_reaches_the_same_adapter(tiny, tmp_path, monkeypatch):
    config = lora_config(iters=30, dropout=0.1)
    params = train_params()
    model, fmt = fresh(tiny, config)
    cases = short_cases(fmt, 40, 0.3, seed=1)
    run_training(model, cases, cases[:8], config, params, plain_loss, tmp_path / "a", "fp")
    uninterrupted = adapter_arrays(model)

    from triage.train import loop as training

    original = training.Monitor.on_train_loss_report

    def dies_after_step_20(self, info):
        original(self, info)
        if self.offset + info["iteration"] >= 20:
            raise Interrupt

    monkeypatch.setattr(training.Monitor, "on_train_loss_report", dies_after_step_20)
    model, _ = fresh(tiny, config)
    with pytest.raises(Interrupt):
        run_training(model, cases, cases[:8], config, params, plain_loss, tmp_path / "b", "fp")
    monkeypatch.setattr(training.Monitor, "on_train_loss_report", original)

    model, _ = fresh(tiny, config)
    result = run_training(model, cases, cases[:8], config, params, plain_loss, tmp_path / "b", "fp")
    assert result.metrics["resumed_from_step"] == 20
    resumed = adapter_arrays(model)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        np.testing.assert_allclose(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_other_params_is_ignored(tiny, tmp_path):
    config = lora_config(iters=10)
    model, fmt = fresh(tiny, config)
    cases = short_cases(fmt, 16, 0.3, seed=2)
    run_training(
        model, cases, cases[:8], config, train_params(steps_per_save=5, steps_per_report=5), plain_loss, tmp_path, "old"
    )
    model, _ = fresh(tiny, config)
    result = run_training(model, cases, cases[:8], config, train_params(), plain_loss, tmp_path, "new")
    assert result.metrics["resumed_from_step"] == 0


def test_a_nan_loss_stops_training(tiny, tmp_path):
    config = lora_config(iters=10)
    model, fmt = fresh(tiny, config)
    cases = short_cases(fmt, 16, 0.3, seed=3)

    def poisoned(model, *batch):
        loss, ntoks = plain_loss(model, *batch)
        return loss * mx.array(float("nan")), ntoks

    with pytest.raises(TrainingDiverged, match="No adapter was written"):
        run_training(model, cases, cases[:8], config, train_params(), poisoned, tmp_path, "nan")


def ed_recall(model, fmt: ChatFormat, cases: list[TokenizedCase]) -> float:
    from triage.model.mlx_lm_internals import hidden_states, project

    model.eval()
    ed = [c for c in cases if c.label == 0]
    hits = 0
    for case in ed:
        hidden = hidden_states(model, mx.array([case.tokens[: case.prompt_length]]))
        logits = project(model, hidden[:, -1, :])[0, mx.array(fmt.label_first_tokens)]
        hits += int(mx.argmax(logits).item() == 0)
    return hits / len(ed)


def test_safety_loss_finds_more_rare_ed_cases_than_plain_cross_entropy(tiny, tmp_path):
    config = lora_config(iters=300, learning_rate=1e-2, rank=8, scale=20.0)
    _, fmt = fresh(tiny, config)
    train_cases = short_cases(fmt, 200, 0.06, seed=4)
    test_cases = short_cases(fmt, 400, 0.3, seed=5)
    recalls = {}
    for name, loss in {"plain": plain_loss, "safety": make_safety_loss(fmt.label_first_tokens, WEIGHTS, COST)}.items():
        model, _ = fresh(tiny, config)
        run_training(
            model,
            train_cases,
            train_cases[:8],
            config,
            train_params(steps_per_report=50, steps_per_eval=200, steps_per_save=200),
            loss,
            tmp_path / name,
            name,
        )
        recalls[name] = ed_recall(model, fmt, test_cases)
    assert recalls["safety"] > recalls["plain"], recalls


def rows(*losses: float) -> list[dict]:
    return [{"step": 10 * i, "val_loss": v} for i, v in enumerate(losses)]


def test_should_stop_after_patience_validations_without_improvement():
    assert not should_stop(rows(3, 2, 2.5), patience=0, min_delta=0.0)
    assert not should_stop(rows(3, 2, 2.5), patience=2, min_delta=0.0)
    assert should_stop(rows(3, 2, 2.5, 2.1), patience=2, min_delta=0.0)
    assert not should_stop(rows(3, 2, 2.5, 1.9), patience=2, min_delta=0.0)
    assert should_stop(rows(3, 2, 1.95, 1.92), patience=2, min_delta=0.1)


def test_early_stopping_keeps_the_best_adapter(tiny, tmp_path):
    config = lora_config(iters=80, learning_rate=1e-2, scale=20.0)
    model, fmt = fresh(tiny, config)
    cases = short_cases(fmt, 40, 0.3, seed=6)
    # The validation loss keeps falling, but by less than min_delta after the first big drops.
    params = train_params(early_stopping_patience=2, early_stopping_min_delta=0.5, steps_per_eval=10, steps_per_save=10)
    result = run_training(model, cases, cases[:8], config, params, plain_loss, tmp_path, "es")
    stopped = result.metrics["early_stopped_at_step"]
    assert stopped is not None and stopped < 80
    best = mx.load(str(tmp_path / "best_adapters.safetensors"))
    for key, value in adapter_arrays(model).items():
        np.testing.assert_array_equal(value, np.array(best[key]))
    assert result.metrics["best_val_step"] < stopped


def test_an_example_longer_than_the_limit_is_an_error_naming_its_line(tiny):
    from triage.model.lm import tokenize_split
    from triage.schema import DataError

    _, fmt = fresh(tiny, lora_config())
    examples = [Example("a", "short", "ED", "ED"), Example("b", "long " * 200, "GP", "GP")]
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'prompt'.*above train.max_seq_length=64"):
        tokenize_split(fmt, examples, "train.jsonl", 64)


def per_token_cross_entropy(model, batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each trained position's cross-entropy, computed by hand, with the mask and the label mask."""
    from triage.model.completion import completion_logits

    tokens, _, positions, mask, label_mask, _ = batch
    logits = np.array(completion_logits(model, tokens, positions), dtype=np.float64)
    targets = np.take_along_axis(np.array(tokens), np.array(positions) + 1, axis=1)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = log_z - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return ce, np.array(mask), np.array(label_mask)


def two_cases(fmt: ChatFormat) -> list[TokenizedCase]:
    return [
        fmt.case(Example("a", "chest pain", "ED - call an ambulance now", "ED")),
        fmt.case(Example("b", "a cold", "HOME - rest and drink fluids", "HOME")),
    ]


def test_label_weight_counts_each_label_token_that_many_times_over_the_real_token_count(tiny):
    from triage.train.losses import make_completion_loss

    model, fmt = fresh(tiny, lora_config())
    batch = collate(two_cases(fmt), mask_prompt=True)
    ce, mask, label_mask = per_token_cross_entropy(model, batch)
    assert label_mask.sum() == sum(len(fmt.label_tokens[c.label]) for c in two_cases(fmt))
    assert (label_mask <= mask).all() and label_mask[:, 0].all()  # the label opens each completion
    assert make_completion_loss(1.0) is plain_loss
    loss, ntoks = make_completion_loss(10.0)(model, *batch)
    expected = ((mask + 9.0 * label_mask) * ce).sum() / mask.sum()
    assert int(ntoks) == mask.sum() and float(loss) == pytest.approx(expected, rel=1e-4)
    weighted_safety, _ = make_safety_loss(
        fmt.label_first_tokens, {"ED": 1, "GP": 1, "HOME": 1}, {t: dict.fromkeys(LABELS, 0.0) for t in LABELS}, 10.0
    )(model, *batch)
    assert float(weighted_safety) == pytest.approx(expected, rel=1e-4)  # zero costs, unit weights: the same loss


def test_validation_splits_the_label_tokens_loss_from_the_reason_texts(tiny):
    from triage.train.losses import split_cross_entropy

    model, fmt = fresh(tiny, lora_config())
    batch = collate(two_cases(fmt), mask_prompt=True)
    ce, mask, label_mask = per_token_cross_entropy(model, batch)
    label_sum, label_count, reason_sum, reason_count = np.array(split_cross_entropy(model, *batch))
    assert label_sum == pytest.approx((ce * label_mask).sum(), rel=1e-4) and label_count == label_mask.sum()
    assert reason_sum == pytest.approx((ce * (mask - label_mask)).sum(), rel=1e-4)
    assert reason_count == (mask - label_mask).sum()


def test_every_epoch_of_batches_holds_every_case_once():
    from triage.train.batches import batch_order

    lengths = [random.Random(i).randint(5, 60) for i in range(23)]
    order = batch_order(23, lengths, 4, seed=3)
    for _ in range(3):
        epoch = [next(order) for _ in range(6)]
        assert sorted(index for batch in epoch for index in batch) == list(range(23))
        assert sorted(map(len, epoch)) == [3, 4, 4, 4, 4, 4]  # the three longest cases share the smaller batch
        # Length buckets: a batch's cases are neighbours in length, so its padding is small.
        assert max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch) < 25


def test_validation_indices_are_the_cases_the_validation_batches_hold(tiny):
    from triage.train.batches import make_iterate_batches, validation_indices

    _, fmt = fresh(tiny, lora_config())
    cases = short_cases(fmt, 23, 0.3, seed=9)
    picked = validation_indices(cases, 4, 2, seed=42)
    batches = list(make_iterate_batches(True, 42, share_prefix=False)(cases, 4, 512))[:2]
    seen = sorted(tuple(np.array(row)[: len(cases[0].tokens)]) for batch in batches for row in batch[0])
    assert len(picked) == 8
    assert sorted(tuple(cases[i].tokens[: len(cases[0].tokens)]) for i in picked) == seen
    assert sorted(validation_indices(cases, 4, -1, seed=42)) == list(range(23))  # every case, 3 in a smaller batch


def test_improvement_follows_the_selection_metric_in_its_direction():
    from triage.train.loop import improved

    acc = [{"step": 0, "val_loss": 3.0, "val_accuracy": 0.4}, {"step": 10, "val_loss": 3.5, "val_accuracy": 0.6}]
    assert improved(acc, 0.0, "val_accuracy") and not improved(acc, 0.0, "val_loss")
    assert not improved(acc, 0.3, "val_accuracy")
    assert not improved([*acc, {"step": 20, "val_loss": 1.0, "val_ed_auroc": None}], 0.0, "val_ed_auroc")


def test_selection_on_validation_accuracy_keeps_the_adapter_with_the_best_accuracy(tiny, tmp_path):
    config = lora_config(iters=40, learning_rate=1e-2)
    model, fmt = fresh(tiny, config)
    cases = short_cases(fmt, 40, 0.3, seed=6)
    accuracies = iter([0.3, 0.7, 0.5, 0.4, 0.2])  # step 0, 10, 20, ...: best at step 10

    def task(streams):
        return {"val_accuracy": next(accuracies), "val_ed_auroc": None}

    params = train_params(select_on="val_accuracy", early_stopping_patience=2, steps_per_eval=10)
    result = run_training(model, cases, cases[:8], config, params, plain_loss, tmp_path, "acc", task)
    assert result.metrics["selected_on"] == "val_accuracy"
    assert result.metrics["best_val_accuracy"] == 0.7 and result.metrics["best_val_step"] == 10
    assert result.metrics["early_stopped_at_step"] == 30
    with pytest.raises(ValueError, match="needs task metrics"):
        run_training(model, cases, cases[:8], config, params, plain_loss, tmp_path / "x", "acc")


def test_early_stopping_when_no_validation_beats_the_first_keeps_the_starting_adapter(tiny, tmp_path):
    config = lora_config(iters=40, learning_rate=1e-2)
    model, fmt = fresh(tiny, config)
    start = adapter_arrays(model)
    cases = short_cases(fmt, 40, 0.3, seed=6)
    params = train_params(early_stopping_patience=1, early_stopping_min_delta=100.0, steps_per_eval=10)
    result = run_training(model, cases, cases[:8], config, params, plain_loss, tmp_path, "never")
    assert result.metrics["early_stopped_at_step"] == 10 and result.metrics["best_val_step"] == 0
    for key, value in adapter_arrays(model).items():
        np.testing.assert_array_equal(value, start[key])


@pytest.mark.parametrize("terminal", [False, True])
def test_the_trainer_draws_colour_and_a_progress_bar_only_on_a_terminal(tiny, tmp_path, monkeypatch, capsys, terminal):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr("sys.stdout.isatty", lambda: terminal)
    config = lora_config(iters=2)
    model, fmt = fresh(tiny, config)
    cases = short_cases(fmt, 8, 0.3, seed=2)
    run_training(
        model,
        cases,
        cases[:4],
        config,
        train_params(steps_per_report=1, steps_per_eval=2),
        plain_loss,
        tmp_path,
        "colour",
    )
    out = capsys.readouterr().out
    drawn = ("\x1b[" in out, "\u2588" in out, "train_loss" in out)  # colour, the bar's blocks, mlx-lm's table
    assert drawn == (terminal, terminal, terminal)
    plain = [line for line in out.splitlines() if "[train] step 2/2 loss " in line]
    assert plain and "ETA" in plain[0]


def test_the_train_stage_wiring_is_the_model_and_objective_the_loop_tests_use(tiny):
    """What stages/train.py and bench/run.py share: the adapted model, and the config's loss."""
    from triage.train.losses import objective
    from triage.train.wiring import lora_model

    mx.random.seed(42)
    trainee = lora_model(Path(tiny), lora_config(), 16)
    model, fmt = fresh(tiny, lora_config())
    assert trainee.fmt.label_first_tokens == fmt.label_first_tokens and trainee.lora["trainable_params"] > 0
    for key, value in adapter_arrays(model).items():
        np.testing.assert_array_equal(adapter_arrays(trainee.model)[key], value)
    assert objective(lora_config(), fmt.label_first_tokens, 1.0) is plain_loss
    batch = collate(short_cases(fmt, 4, 0.5, seed=3), mask_prompt=True)
    safety = lora_config(kind="safety", class_weights=WEIGHTS, cost_matrix=COST)
    expected, _ = make_safety_loss(fmt.label_first_tokens, WEIGHTS, COST, 2.0)(model, *batch)
    got, _ = objective(safety, fmt.label_first_tokens, 2.0)(model, *batch)
    assert got.item() == pytest.approx(expected.item())


def test_the_fit_sample_is_the_same_cases_every_time_and_as_many_as_asked():
    examples = [Example(id=f"c{i}", prompt=f"p{i}", completion="GP", label="GP") for i in range(100)]
    first = train_sample(examples, seed=7, size=16)
    assert [e.id for e in first] == [e.id for e in train_sample(examples, seed=7, size=16)]
    assert len(first) == len({e.id for e in first}) == 16
    assert len(train_sample(examples, seed=7, size=500)) == 100


def test_the_train_stage_checks_the_fit_on_train_fit_sample_of_its_own_cases(tiny, tmp_path, monkeypatch):
    """``train.fit_sample`` reaches the fit check: the stage scores that many cases, all from train.jsonl."""
    from dataclasses import replace

    from conftest import ROOT
    from triage.config import load_params
    from triage.io import write_jsonl
    from triage.train import wiring

    splits = {
        name: [Example(f"{name}{i}", f"cough {i}", "GP", "GP") for i in range(n)]
        for name, n in [("train", 40), ("valid", 8)]
    }
    for name, examples in splits.items():
        write_jsonl(tmp_path / f"{name}.jsonl", [example.to_json() for example in examples])
    scored: list[list[str]] = []
    monkeypatch.setattr(
        wiring, "sample_accuracy", lambda model, fmt, examples, *rest: scored.append([e.id for e in examples]) or 1.0
    )

    class Stop(Exception):
        pass

    def first_validation_only(model, train, valid, config, params, loss, checkpoints, run_id, metrics, **kwargs):
        metrics(())
        raise Stop

    monkeypatch.setattr(wiring, "run_training", first_validation_only)
    params = load_params(ROOT / "params.yaml")
    params = replace(params, train=train_params(fit_sample=7))
    paths = wiring.TrainPaths(
        Path(tiny), tmp_path, tmp_path / "adapter", tmp_path / "train.json", tmp_path / "log", tmp_path / "ckpt"
    )
    with pytest.raises(Stop):
        wiring.train_adapter(params, "medical_baseline", paths)
    assert len(scored) == 1 and len(scored[0]) == len(set(scored[0])) == 7
    assert set(scored[0]) <= {example.id for example in splits["train"]}
