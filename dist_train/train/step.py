"""One optimizer step, the same in training and in the tools that train (find-lr, find-batch):
an accumulating forward and backward under the run's precision, then the update."""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager as ContextManager
from typing import TYPE_CHECKING

import torch
from torch import nn

from dist_train.distributed import all_reduce_min
from dist_train.efficiency import full_tensor
from dist_train.parallel import Strategy

if TYPE_CHECKING:
    from dist_train.train.assembly import Run


def forward_backward(run: Run, amp: ContextManager, sync: bool = True) -> tuple[torch.Tensor, float]:
    """One optimizer step's micro-batches through forward and backward, gradients all-reduced
    on the last (sync=False: on none, for a trial that must not leave a rank in a collective).
    Returns the step's loss (the sum of the micro-batch means, left on the device) and the
    seconds spent waiting for data."""
    accum, device, data_wait = run.data.batch.accum, run.env.device, 0.0
    micro_losses = []
    for micro in range(accum):
        fetch_start = time.perf_counter()
        inputs, targets = run.data.train.next_micro_batch()
        data_wait += time.perf_counter() - fetch_start
        inputs = run.inputs_to_device(inputs)
        targets = targets.to(device, non_blocking=True)
        # Gradients are all-reduced only on the last micro-batch of the step.
        with run.strategy.gradient_sync(run.model, enabled=sync and micro == accum - 1):
            with amp:
                loss = run.task.loss(run.model, inputs, targets)
            # Each micro-batch loss is a mean over an equal-sized micro-batch, so dividing by
            # the accumulation count makes the summed gradient that of one big batch.
            run.scaler.scale(loss / accum if accum > 1 else loss).backward()
        micro_losses.append(loss.detach())
    return (micro_losses[0] if accum == 1 else torch.stack(micro_losses).sum()), data_wait


def optimizer_step(
    run: Run, params: list[nn.Parameter], step_loss: torch.Tensor, measure_norm: bool, skip_nonfinite: bool
) -> tuple[bool, torch.Tensor | None]:
    """After forward_backward, the one optimizer update of training and the tools: clip as
    configured, or only measure the norm (`measure_norm`), on unscaled gradients; with
    `skip_nonfinite` (train.nonfinite=skip: a collective and a host sync, so never in a trial
    that must not wait for other ranks) every rank agrees whether this step's loss and gradient
    are finite and all skip it if not; then step, zero, schedule. Returns whether the weights
    were updated, and the gradient norm where it was computed."""
    clip = run.cfg.train.clip_grad_norm
    grad_norm = None
    if clip is not None or measure_norm or skip_nonfinite:
        run.scaler.unscale_(run.optimizer)  # clip and report the true gradient, not the fp16-scaled one
        if clip is not None:
            grad_norm = nn.utils.clip_grad_norm_(params, clip)
        else:  # only reported: clipping at infinity would still rescale every gradient by 1
            grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    update = True
    if skip_nonfinite:
        finite = torch.isfinite(step_loss) & torch.isfinite(full_tensor(grad_norm))
        update = bool(all_reduce_min(finite.to(torch.int32)).item())
    if update:
        run.scaler.step(run.optimizer)
    run.scaler.update()
    run.strategy.zero_grad(run.optimizer)
    run.scheduler.step()  # once per optimizer step, never per micro-batch
    return update, grad_norm


def autocast(precision: str, device: torch.device, strategy: Strategy) -> ContextManager:
    """Mixed precision around the forward: autocast, or nothing where the strategy casts
    (FSDP's mixed-precision policy)."""
    if precision == "fp32" or strategy.handles_precision:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
