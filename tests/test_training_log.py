"""The DVCLive training log: every value as a curve, only the comparable ones in metrics.json."""

from __future__ import annotations

import json

from triage.train.log import SUMMARY, TrainingLog


def test_metrics_json_keeps_what_runs_are_compared_on_and_the_curves_keep_everything(tmp_path):
    train = [
        {
            "step": step,
            "train_loss": 3.0 / step,
            "learning_rate": 1e-4 / step,
            "tokens_per_s": 30.0,
            "peak_memory_mb": 900.0,
        }
        for step in (10, 20)
    ]
    val = [
        {
            "step": 20,
            "val_loss": 2.5,
            "val_label_loss": 1.2,
            "val_reason_loss": 2.7,
            "val_accuracy": 0.5,
            "val_ed_auroc": 0.7,
            "train_accuracy": 0.75,
        }
    ]
    log = TrainingLog(tmp_path, train, val)
    log.close()
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary == {
        "step": 20,
        "train": {"loss": 0.15, "accuracy": 0.75},
        "val": {"loss": 2.5, "accuracy": 0.5, "ed_auroc": 0.7},
    }
    curves = {
        path.relative_to(tmp_path / "plots/metrics").with_suffix("").as_posix()
        for path in (tmp_path / "plots/metrics").rglob("*.tsv")
    }
    assert SUMMARY < curves
    assert {"train/learning_rate", "train/peak_memory_mb", "val/label_loss", "val/reason_loss"} <= curves
