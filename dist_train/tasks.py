"""What a run optimizes and how it is judged: one Task object owns the loss and the
validation metrics, so the training loop and evaluation never branch on the kind of task.

Losses are means over a micro-batch (the accumulation rule in the loop relies on that).
Evaluation adds up loss sums and torchmetrics states (dist_train/metrics.py), all sums, so
the numbers are exact over any sharding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import ConfigError, TrainConfig, import_object
from dist_train.metrics import Evaluation, MetricChoice, classification_defaults, per_element

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


class Task:
    """A loss given as (outputs, targets) -> mean, with its validation metrics: a list of
    train.metrics names, or a function choosing them from the first validation batch."""

    def __init__(self, name: str, loss: LossFn, metrics: MetricChoice, sums: Callable | None = None) -> None:
        self.name, self._loss, self.metrics = name, loss, metrics
        # (outputs, targets) -> (loss sum, count) for validation; None: mean x batch size.
        self._loss_sums = sums

    def loss(self, model: nn.Module, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of one micro-batch: a mean over it."""
        return self._loss(model(inputs), targets)

    def eval_forward(self, model: nn.Module, inputs: Any, targets: torch.Tensor) -> tuple[torch.Tensor, int, Any]:
        """One validation batch through the model: (loss sum, loss count, the outputs metrics read)."""
        outputs = model(inputs)
        if self._loss_sums is not None:
            loss_sum, count = self._loss_sums(outputs, targets)
        else:  # a user's loss is a mean: weigh it by the samples it averaged
            loss_sum, count = self._loss(outputs, targets).float() * len(targets), len(targets)
        return loss_sum, count, outputs

    def evaluation(self) -> Evaluation:
        """Fresh metric states for one pass over a validation split."""
        return Evaluation(self.metrics)


class ModelLoss(Task):
    """The model computes its own loss: called as model(inputs, targets), it returns the loss,
    a dict holding "loss" (and "logits" when metrics are asked for), or an object with .loss."""

    def __init__(self, metrics: list[str]) -> None:
        super().__init__("model", _unused, metrics)

    def _call(self, model: nn.Module, inputs: Any, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out = model(inputs, targets)
        if isinstance(out, torch.Tensor):
            return out, None
        if isinstance(out, dict) and "loss" in out:
            return out["loss"], out.get("logits")
        if hasattr(out, "loss"):
            return out.loss, getattr(out, "logits", None)
        raise ConfigError(
            f"train.loss=model: the model returned {type(out).__name__}; return the loss, or a dict with 'loss'"
        )

    def loss(self, model: nn.Module, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self._call(model, inputs, targets)[0]

    def eval_forward(self, model: nn.Module, inputs: Any, targets: torch.Tensor) -> tuple[torch.Tensor, int, Any]:
        loss, logits = self._call(model, inputs, targets)
        if self.metrics and logits is None:
            raise ConfigError("train.metrics needs the model to return a dict with 'logits' beside 'loss'")
        return loss.float() * len(targets), len(targets), logits


def _unused(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    raise AssertionError("ModelLoss computes its loss in the model")


def _cross_entropy(label_smoothing: float) -> tuple[LossFn, Callable]:
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Flattened so one line serves classes (batch, classes) and tokens (batch, seq, vocab).
        return F.cross_entropy(outputs.flatten(0, -2).float(), targets.flatten(), label_smoothing=label_smoothing)

    def sums(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        flat = targets.flatten()
        total = F.cross_entropy(outputs.flatten(0, -2).float(), flat, reduction="sum", label_smoothing=label_smoothing)
        return total, flat.numel()

    return loss, sums


def _elementwise(fn: Callable[..., torch.Tensor]) -> tuple[LossFn, Callable]:
    """A loss averaged over every target element (bce, mse, l1), and its validation sums."""

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return fn(per_element(outputs, targets), targets.float())

    def sums(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        return fn(per_element(outputs, targets), targets.float(), reduction="sum"), targets.numel()

    return loss, sums


# train.metrics when it is null: classes get accuracy, top-5, macro precision, recall and F1 and
# a confusion matrix, token sequences accuracy only (see classification_defaults).
DEFAULT_METRICS: dict[str, MetricChoice] = {
    "cross_entropy": classification_defaults,
    "bce_with_logits": ["accuracy"],
    "mse": ["mae"],
    "l1": ["mae"],
}


def build_task(cfg: TrainConfig, loss: LossFn | None = None) -> Task:
    """The task train.loss names, or one around a loss function passed to dist_train.fit."""
    if loss is not None:
        return Task(getattr(loss, "__qualname__", type(loss).__name__), loss, cfg.metrics or [])
    if cfg.loss == "model":
        return ModelLoss(cfg.metrics or [])
    builtin = {
        "cross_entropy": lambda: _cross_entropy(cfg.label_smoothing),
        "bce_with_logits": lambda: _elementwise(F.binary_cross_entropy_with_logits),
        "mse": lambda: _elementwise(F.mse_loss),
        "l1": lambda: _elementwise(F.l1_loss),
    }
    if cfg.loss in builtin:
        loss_fn, sums = builtin[cfg.loss]()
        metrics = DEFAULT_METRICS[cfg.loss] if cfg.metrics is None else cfg.metrics
        return Task(cfg.loss, loss_fn, metrics, sums)
    return Task(cfg.loss, import_object(cfg.loss, "train.loss"), cfg.metrics or [])
