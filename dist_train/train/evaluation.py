"""Validation: the task's loss and metrics over the validation split, the same numbers on every
rank; training's scheduled evaluations and `dist-train eval` both call it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

import torch
from torch import nn

from dist_train.distributed import all_reduce_max, all_reduce_sum
from dist_train.tasks import Task
from dist_train.train.assembly import Run


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    loader,
    inputs_to_device: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    amp: ContextManager,
    max_batches: int | None = None,
    save_to: tuple[Path, str] | None = None,
) -> dict[str, float]:
    """The task's loss and metrics over the validation split (or the first max_batches of each
    rank's shard, always the same ones), summed across ranks so every rank gets the same numbers.
    `save_to`, given on rank 0 only: (directory, tag) for what the metrics keep as files (a
    confusion matrix: directory/confusion/tag.csv and .png).

    Every rank runs the same number of forwards (a sharded model all-gathers inside each one);
    a rank whose shard ran out repeats its last batch without counting it. The metric states
    are then summed in one all-reduce that every rank makes (torchmetrics' own sync is off).
    """
    model.eval()
    evaluation = task.evaluation()
    own_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    rounds = int(all_reduce_max(torch.tensor(own_batches, device=device)).item())
    batches = iter(loader)
    for index in range(rounds):
        counted = index < own_batches
        if counted:
            inputs, targets = next(batches)
            inputs, targets = inputs_to_device(inputs), targets.to(device, non_blocking=True)
        with amp:
            loss_sum, count, outputs = task.eval_forward(model, inputs, targets)
        if counted:
            evaluation.update(loss_sum, count, outputs, targets)
    evaluation.all_reduce(all_reduce_sum)
    if save_to is not None:
        evaluation.save(*save_to)
    return evaluation.compute()


def evaluate_run(run: Run, model: nn.Module, save_to: tuple[Path, str] | None = None) -> dict[str, float]:
    """`evaluate` of `model` (the run's own, its EMA, or a copy taking the same inputs: a
    quantized one) with the run's task, validation loader, input layout, precision and
    train.eval_batches: what training logs and `dist-train eval` reports."""
    return evaluate(
        model, run.task, run.data.val_loader, run.inputs_to_device, run.env.device, run.autocast(),
        run.cfg.train.eval_batches, save_to,
    )  # fmt: skip
