"""The training curves through DVCLive, in the format `dvc plots`, `dvc exp show` and DVC Studio read.

One TSV per metric under ``<dir>/plots/metrics/`` (``train/loss``, ``val/accuracy``, ...)
and, in ``<dir>/metrics.json``, the latest values of the few that runs are compared on
(``SUMMARY``): a column each in ``dvc exp show`` for every run. The rest are curves only:
the learning rate ends near 0, peak memory is in eval.json, the label and reason losses
explain a curve rather than rank a run. A resumed run first replays the
rows its checkpoint kept, so every step is logged exactly once.
"""

from __future__ import annotations

from pathlib import Path

TRAIN_KEYS = {
    "train_loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "tokens_per_s": "train/tokens_per_s",
    "peak_memory_mb": "train/peak_memory_mb",
}


SUMMARY = {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "val/ed_auroc"}


def _prune(summary: dict, keep: set[str], prefix: str = "") -> None:
    """Drop from DVCLive's nested summary every metric whose path is not in ``keep`` (``step`` stays)."""
    for key in list(summary):
        path = f"{prefix}{key}"
        if isinstance(summary[key], dict):
            _prune(summary[key], keep, f"{path}/")
            if not summary[key]:
                del summary[key]
        elif path != "step" and path not in keep:
            del summary[key]


class TrainingLog:
    """A DVCLive ``Live`` that the training loop's callback writes train and validation rows to."""

    def __init__(self, directory: Path, train_rows: list[dict], val_rows: list[dict]):
        from dvclive import Live

        # The paths are declared in dvc.yaml (dvcyaml=False); the stage, not DVCLive, makes the experiment.
        self.live = Live(str(directory), resume=False, report=None, save_dvc_exp=False, dvcyaml=False)
        for row in val_rows:
            self.validation(row)
        for row in train_rows:
            self.train(row)

    def train(self, row: dict) -> None:
        self._log(row["step"], {name: row[key] for key, name in TRAIN_KEYS.items()})

    def validation(self, row: dict) -> None:
        """The validation metrics, and the argmax accuracy on the fixed sample of training cases."""
        values = {
            f"val/{key[len('val_') :]}": value
            for key, value in row.items()
            if key.startswith("val_") and value is not None
        }
        if row.get("train_accuracy") is not None:
            values["train/accuracy"] = row["train_accuracy"]
        self._log(row["step"], values)

    def _log(self, step: int, values: dict[str, float]) -> None:
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, value)
        _prune(self.live.summary, SUMMARY)
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()
