"""checkpoint.keep_best: keep the k checkpoints with the best validation metric, beside the
newest checkpoint.keep_last (which are never deleted, whatever their metric).

A checkpoint is judged by the scheduled evaluation at its own step (config validation makes
every checkpoint.every_steps step one). The scores of the best k go into the checkpoint, so a
resumed run keeps judging against them; a rewind to an older checkpoint restores that
checkpoint's scores, and the newer ones are set aside with the rest of the abandoned future.
"""

from __future__ import annotations

import math
from typing import Any

from dist_train.components.base import Component, metric_value
from dist_train.config import KeepBestConfig


class KeepBest(Component):
    name = "keep_best"

    def __init__(self, cfg: KeepBestConfig) -> None:
        self.cfg = cfg
        self.scores: dict[int, float] = {}  # step -> metric, the best k saved checkpoints
        self.evaluated: tuple[int, float] | None = None  # the latest scheduled evaluation
        self.notes = [f"keep best: the {cfg.k} checkpoint(s) with the {cfg.mode} {cfg.metric}, beside the newest"]

    def on_start(self, run) -> None:
        run.checkpointer.keep_also(self.best_steps)

    def after_eval(self, run, step: int, metrics: dict[str, float]) -> None:
        self.evaluated = (step, metric_value(metrics, "checkpoint.keep_best.metric", self.cfg.metric))

    def before_save(self, run, step: int) -> None:
        if self.evaluated is None or self.evaluated[0] != step or not math.isfinite(self.evaluated[1]):
            return  # a save without its own evaluation (a stop signal's) is not a candidate
        before = self.best_steps()
        self.scores[step] = self.evaluated[1]
        self.scores = dict(sorted(self.scores.items(), key=self._rank)[: self.cfg.k])
        if self.best_steps() != before:
            ranked = ", ".join(f"step {s} ({v:.6g})" for s, v in sorted(self.scores.items(), key=self._rank))
            run.logger.message(f"best {self.cfg.metric}: {ranked}")

    def _rank(self, item: tuple[int, float]) -> tuple[float, int]:
        """Best first; between equal values the earlier checkpoint."""
        step, value = item
        return (value if self.cfg.mode == "min" else -value, step)

    def best_steps(self) -> frozenset[int]:
        return frozenset(self.scores)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": [[step, value] for step, value in self.scores.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = {int(step): float(value) for step, value in state["scores"]}
