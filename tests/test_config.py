"""params.yaml: seed 000's numbers, and clear errors for bad keys."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import ROOT
from triage.config import ParamsError, load_params

SEED_000 = {  # name: (kind, learning rate, batch, rank, scale, dropout, iters)
    "medical_baseline": ("standard", 3e-5, 4, 8, 20.0, 0.0, 800),
    "medical_precision": ("standard", 1e-5, 4, 16, 25.0, 0.05, 1000),
    "medical_fast": ("standard", 5e-5, 8, 8, 20.0, 0.0, 600),
    "medical_conservative": ("standard", 1e-5, 2, 4, 15.0, 0.1, 1200),
    "medical_high_capacity": ("standard", 2e-5, 4, 32, 30.0, 0.05, 800),
    "triage_optimized": ("standard", 4e-5, 6, 12, 22.0, 0.02, 800),
    "ultra_safe": ("safety", 5e-6, 2, 4, 2.0, 0.15, 1500),
    "balanced_safe": ("safety", 1e-5, 4, 8, 8.0, 0.1, 1200),
    "performance_safe": ("safety", 2e-5, 6, 12, 12.0, 0.08, 1000),
    "high_capacity_safe": ("safety", 8e-6, 2, 16, 8.0, 0.12, 1400),
}
TARGET_ED_RECALL = {"ultra_safe": 0.98, "balanced_safe": 0.96, "performance_safe": 0.95, "high_capacity_safe": 0.98}


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def test_every_seed_config_has_its_numbers(params):
    assert set(params.configs) == set(SEED_000)
    for name, (kind, lr, batch, rank, scale, dropout, iters) in SEED_000.items():
        c = params.configs[name]
        assert (c.kind, c.batch_size, c.rank, c.iters) == (kind, batch, rank, iters), name
        assert c.learning_rate == pytest.approx(lr) and c.scale == scale and c.dropout == dropout, name


def test_safety_configs_carry_targets_weights_and_costs(params):
    for name, target in TARGET_ED_RECALL.items():
        c = params.configs[name]
        assert c.target_ed_recall == target
        assert c.class_weights == {"ED": 5.0, "GP": 2.0, "HOME": 1.0}
        assert c.cost_matrix["ED"] == {"ED": 0.0, "GP": 100.0, "HOME": 100.0}
        assert c.cost_matrix["GP"]["ED"] == 2.0 and c.cost_matrix["HOME"]["ED"] == 2.0


def test_common_parameters_and_full_selection(params):
    t = params.train
    assert (t.weight_decay, t.warmup_ratio, t.max_seq_length, t.num_layers, t.seed) == (0.01, 0.1, 2048, 16, 42)
    assert (t.steps_per_eval, t.steps_per_report, t.steps_per_save, t.grad_checkpoint, t.mask_prompt) == (
        200,
        50,
        100,
        False,
        True,
    )
    assert params.quantize.group_size == 64
    assert params.run.bits == ["4bit", "8bit"] and len(params.run.configs) == 10
    assert params.run.models == ["smollm2-135m", "smollm2-360m", "gemma3-270m"]
    assert all(v is None for v in vars(params.lora).values())


def test_lora_override_replaces_only_set_values(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["lora"]["rank"] = 16
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_params(path).config("ultra_safe")
    assert config.rank == 16 and config.scale == 2.0 and config.iters == 1500


def test_the_demo_overrides_make_valid_params(tmp_path):
    """Every `-S key=value` of scripts/demo.sh names a real key with a valid value."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = re.findall(r"-S '([^=']+)=([^']*)'", (ROOT / "scripts" / "demo.sh").read_text())
    assert len(overrides) >= 10, overrides
    for key, value in overrides:
        *parents, leaf = key.split(".")
        node = raw
        for parent in parents:
            node = node[parent]
        assert leaf in node, key
        node[leaf] = yaml.safe_load(value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    demo = load_params(path)
    assert demo.train.fit_sample == 32 and demo.lora.iters == 60


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["train"].update(warmup_ratoi=0.1), "unknown key 'train.warmup_ratoi'"),
        (lambda p: p["configs"]["ultra_safe"].update(rank="8"), "'configs.ultra_safe.rank' must be int"),
        (lambda p: p["configs"]["medical_fast"].update(learning_rate="5e-5"), "YAML reads 3e-5 as text"),
        (lambda p: p["train"].pop("seed"), "missing key 'train.seed'"),
        (lambda p: p["run"].update(models=["smollm3"]), "'run.models[0]' is 'smollm3'"),
        (lambda p: p["run"].update(bits=["16bit"]), "'run.bits[0]'"),
        (lambda p: p["lora"].update(rank=True), "'lora.rank' must be int"),
        (lambda p: p["configs"]["balanced_safe"].pop("cost_matrix"), "'configs.balanced_safe.cost_matrix'"),
        (
            lambda p: p["configs"]["medical_fast"].update(class_weights={"ED": 1.0, "GP": 1.0, "HOME": 1.0}),
            "only applies to kind: safety",
        ),
        (lambda p: p["evaluate"]["cost_matrix"]["ED"].update(ED=1.0), "a correct answer costs 0"),
        (lambda p: p["data"].update(label_mix={"ED": 0.5, "GP": 0.5, "HOME": 0.5}), "sum to 1"),
        (lambda p: p["evaluate"].update(decision="vote"), "expected one of: argmax, cost_aware"),
        (lambda p: p["models"]["tiny"].update(source="s3://bucket"), "'models.tiny.source'"),
        (lambda p: p["train"].update(steps_per_eval=75), "multiple of 'train.steps_per_report'"),
        (lambda p: p["train"].update(fit_sample=0), "'train.fit_sample' must be at least 1"),
        (
            lambda p: p["data"]["conditions"]["wording"].update(test=5),
            "'data.conditions.wording.test' must be at least",
        ),
        (lambda p: p["data"]["conditions"]["complaint"].pop("valid"), "'data.conditions.complaint' must have exactly"),
        (lambda p: p["data"]["conditions"].update(held_out_share=0.6), "'data.conditions.held_out_share'"),
    ],
)
def test_bad_params_are_rejected_with_the_key(tmp_path, edit, message):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)
