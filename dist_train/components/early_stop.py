"""train.early_stop: end the run when a validation metric stops improving.

After each evaluation the metric either improves on the best so far by more than min_delta
(the patience count starts over) or it does not (one more evaluation without improvement);
after `patience` of those in a row the run saves a checkpoint and ends with one line, exit
code 0. Every rank decides alike: evaluation metrics are all-reduced, the same on every rank.
The count, the best value and the step it stopped at are checkpointed, so a run resumed in the
middle of its patience stops at the same step as one never interrupted, and resuming a run
that stopped early trains nothing more.
"""

from __future__ import annotations

import math
from typing import Any

from dist_train.components.base import Component, metric_value
from dist_train.config import EarlyStopConfig


class EarlyStopping(Component):
    name = "early_stop"

    def __init__(self, cfg: EarlyStopConfig) -> None:
        self.cfg = cfg
        self.best: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.stopped_at: int | None = None
        better = "below" if cfg.mode == "min" else "above"
        self.notes = [
            f"early stop: after {cfg.patience} evaluation(s) in a row without {cfg.metric} "
            f"{better} its best by more than {cfg.min_delta:g}"
        ]

    def after_eval(self, run, step: int, metrics: dict[str, float]) -> None:
        value = metric_value(metrics, "train.early_stop.metric", self.cfg.metric)
        if self.improves(value):
            self.best, self.best_step, self.evals_without_improvement = value, step, 0
        else:
            self.evals_without_improvement += 1
        if self.evals_without_improvement >= self.cfg.patience and self.stopped_at is None:
            self.stopped_at = step

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.cfg.mode == "min":
            return value < self.best - self.cfg.min_delta
        return value > self.best + self.cfg.min_delta

    def stop_reason(self) -> str | None:
        if self.stopped_at is None:
            return None
        return (
            f"early stop at step {self.stopped_at}: {self.cfg.metric} did not improve on "
            f"{self.best:.6g} (step {self.best_step}) by more than {self.cfg.min_delta:g} "
            f"in {self.cfg.patience} evaluation(s)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "stopped_at": self.stopped_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.evals_without_improvement, self.stopped_at = state["evals_without_improvement"], state["stopped_at"]
