"""Rank-0 logging: every record goes to each of the run's loggers (sinks): metrics.jsonl, the
console (or a progress bar on a terminal), and where switched on W&B, TensorBoard and MLflow.
The RunLogger is a component (components/base.py): the first in the run's list, it gets each
record through on_log, as every other component does after it.

Only rank 0 builds a RunLogger that writes anything, so a multi-process job produces exactly
one metrics file, one W&B run, one TensorBoard event stream and one MLflow run. Each library is
imported only when its logging is switched on. A sink is any object with `log(step, metrics,
walltime)`, `finished(hparams, final_metrics, step)` and `close(exit_code)` (base.Sink).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from dist_train.components import Component
from dist_train.config import Config
from dist_train.logger.base import Sink, hyperparameters
from dist_train.logger.console import Console
from dist_train.logger.jsonl import MetricsFile
from dist_train.logger.tensorboard_sink import tensorboard_tag

__all__ = ["RunLogger", "Sink", "hyperparameters", "new_wandb_run_id", "tensorboard_tag"]


def new_wandb_run_id() -> str:
    """The run's identity across resumes (W&B's run id; MLflow finds its run by it).
    W&B ids are [a-z0-9]; 12 hex characters are unique enough and need no wandb import."""
    return uuid.uuid4().hex[:12]


class RunLogger(Component):
    """Rank 0's loggers behind one component; on every other rank it writes nothing. Beyond the
    protocol, `message` (a console line), `finished` (the run trained its last step) and
    `close(exit_code)` (also after a failure: W&B and MLflow mark the run failed), which the
    trainer calls."""

    name = "loggers"  # no state of its own: the run's identity across resumes is in the checkpoint's record

    def __init__(
        self, cfg: Config, run_dir: Path, enabled: bool, run_id: str, resumed_step: int, total_steps: int
    ) -> None:
        self.enabled, self.cfg = enabled, cfg
        self.last_step = resumed_step
        self.last_validation: dict[str, float] = {}  # this invocation's latest val_* values
        self.sinks: list[Sink] = []
        self.console = Console(cfg.train.progress_bar, resumed_step, total_steps) if enabled else None
        if not enabled:
            return
        # Each library first, so a missing package stops the run before metrics.jsonl is touched.
        if cfg.logging.tensorboard:
            from dist_train.logger.tensorboard_sink import TensorBoard

            self.sinks.append(TensorBoard(run_dir / "tensorboard", resumed_step))
        if cfg.logging.wandb.mode != "disabled":
            from dist_train.logger.wandb_sink import WandB

            self.sinks.append(WandB(cfg, run_dir, run_id))
        if cfg.logging.mlflow.enabled:
            from dist_train.logger.mlflow_sink import MLflow

            self.sinks.append(MLflow(cfg, run_dir, run_id, resumed_step))
        self.sinks.insert(0, MetricsFile(run_dir / "metrics.jsonl", resumed_step))
        self.sinks.append(self.console)

    def on_log(self, run: Any, step: int, metrics: dict[str, Any]) -> None:
        self.log(step, metrics)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        walltime = round(time.time(), 3)  # wall clock: plots, benchmarks
        self.last_step = step
        self.last_validation.update({k: v for k, v in metrics.items() if k.startswith("val_")})
        for sink in self.sinks:
            sink.log(step, metrics, walltime)

    def message(self, text: str) -> None:
        if self.console is not None:
            self.console.message(text)

    def finished(self, extra_hparams: dict[str, float | int | str]) -> None:
        """The run trained its last step: the hyperparameters beside the final validation metrics
        (TensorBoard's HParams table, MLflow's params)."""
        if not self.enabled or not self.last_validation:
            return
        hparams = {**hyperparameters(self.cfg), **extra_hparams}
        for sink in self.sinks:
            sink.finished(hparams, dict(self.last_validation), self.last_step)

    def close(self, exit_code: int = 0) -> None:
        for sink in reversed(self.sinks):
            sink.close(exit_code)
        self.sinks = []
