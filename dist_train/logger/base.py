"""What a logger (sink) is, and what the loggers share."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from dist_train.config import Config

# Config keys that say where and how a run is recorded, not what it learns: not hyperparameters.
NOT_HYPERPARAMETERS = ("run.output_dir", "train.progress_bar", "train.stop_at_step", "checkpoint.", "logging.")


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, Any], walltime: float) -> None: ...

    def finished(self, hparams: dict[str, float | int | str], final_metrics: dict[str, float], step: int) -> None:
        """The run trained its last step (not called after a stop or a failure)."""

    def close(self, exit_code: int) -> None: ...


class NoFinish:
    def finished(self, hparams: dict[str, float | int | str], final_metrics: dict[str, float], step: int) -> None:
        pass


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers among a record's values (not bools)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def hyperparameters(cfg: Config) -> dict[str, float | int | str]:
    """The config's scalar settings as flat dotted keys (TensorBoard's HParams, MLflow's params)."""
    flat: dict[str, float | int | str] = {}

    def walk(section: Any, prefix: str) -> None:
        for item in dataclasses.fields(section):
            key, value = prefix + item.name, getattr(section, item.name)
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif key.startswith(NOT_HYPERPARAMETERS) or value is None or isinstance(value, (dict, list)):
                continue  # lists and mappings are not HParams values; None is "not set"
            elif isinstance(value, bool):  # else a number 0/1: bool is an int to the HParams writer
                flat[key] = "true" if value else "false"
            else:
                flat[key] = value

    walk(cfg, "")
    return flat
