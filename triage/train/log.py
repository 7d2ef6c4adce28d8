"""The training curves through DVCLive, in the format `dvc plots`, `dvc exp show` and DVC Studio read.

One TSV per metric under ``<dir>/plots/metrics/`` (``train/loss``, ``val/accuracy``, ...)
and the latest values in ``<dir>/metrics.json``. A resumed run first replays the
rows its checkpoint kept, so every step is logged exactly once.
"""

from __future__ import annotations

from pathlib import Path

TRAIN_KEYS = {"train_loss": "train/loss", "learning_rate": "train/learning_rate",
              "tokens_per_s": "train/tokens_per_s", "peak_memory_mb": "train/peak_memory_mb"}


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
        self._log(row["step"], {f"val/{key[len('val_'):]}": value for key, value in row.items()
                                if key.startswith("val_") and value is not None})

    def _log(self, step: int, values: dict[str, float]) -> None:
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()
