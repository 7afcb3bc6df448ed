"""What a run is made of (Run), the model and optimizer it trains (build_trainable), and one
optimizer step's micro-batches (forward_backward): shared by training (trainer.py), the LR
range test (lr_finder.py), the batch-size search (batch_finder.py) and `dist-train eval`."""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from dist_train import finetune
from dist_train.checkpointer import Checkpointer
from dist_train.components import Components
from dist_train.config import Config
from dist_train.data import DataPipeline, Datasets
from dist_train.distributed import DistEnv, all_reduce_min, broadcast_module, use_channels_last
from dist_train.efficiency import full_tensor
from dist_train.logger import RunLogger
from dist_train.models import build_model
from dist_train.optim import build_optimizer, check_fused, use_fused
from dist_train.parallel import Strategy, prepare_blocks
from dist_train.preemption import StopRequest
from dist_train.process_settings import ScheduledGC
from dist_train.tasks import LossFn, Task


@dataclass
class UserParts:
    """What dist_train.fit was handed as Python objects; each wins over its name in the config."""

    model: nn.Module | None = None
    datasets: Datasets | None = None
    loss: LossFn | None = None
    callbacks: list[Any] = field(default_factory=list)  # the user's components, after the config's


@dataclass
class Run:
    """What a run is made of. The loop takes every part from here by name."""

    cfg: Config
    env: DistEnv
    model: nn.Module  # as wrapped by the strategy
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    data: DataPipeline
    task: Task
    logger: RunLogger
    checkpointer: Checkpointer | None  # None: a tool that trains without checkpoints (find-lr)
    stop: StopRequest | None
    channels_last: bool = False  # inputs go to the device in the layout the model was given
    components: Components = field(default_factory=Components)  # hooked into the loop (components/)
    scheduled_gc: ScheduledGC = field(default_factory=lambda: ScheduledGC(0))  # collections at agreed steps

    def train_mode(self) -> None:
        finetune.train_mode(self.model, self.cfg.model)

    def autocast(self) -> ContextManager:
        return autocast(self.cfg.train.precision, self.env.device, self.strategy)

    def inputs_to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inputs on the device as the model takes them (layout; uint8 images normalized there)."""
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        return self.data.inputs_to_device(inputs, memory_format=layout)


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


@dataclass
class Trainable:
    """The model as the strategy wrapped it and the optimizer over its trainable parameters."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    fused: bool  # the optimizer's kernel choice, kept over a checkpoint's on resume
    channels_last: bool
    notes: list[str]  # what fine-tuning did, for the log


def build_trainable(
    cfg: Config,
    env: DistEnv,
    strategy: Strategy,
    data: DataPipeline,
    user_model: nn.Module | None = None,
    resuming: bool = False,
) -> Trainable:
    """The model from model.name (or the user's object, given rank 0's weights), fine-tuning
    applied, laid out and wrapped by the strategy; then its optimizer. The same for training,
    the LR range test and the batch-size search. Call after seeding: the weights draw on it."""
    if user_model is None:
        model = build_model(cfg.model, data.spec).to(env.device)
    else:  # built by the user's script on each rank, maybe from different random states
        model = user_model.to(env.device)
        broadcast_module(model)
    notes = finetune.prepare_model(model, cfg.model, resuming=resuming)
    channels_last = use_channels_last(
        cfg.train.channels_last, env.device, data.spec.input_shape, sharded=strategy.name == "fsdp"
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = strategy.wrap(prepare_blocks(model, cfg.parallel.activation_checkpointing, cfg.train.compile))
    check_fused(cfg.optim, cfg.parallel)
    fused = use_fused(cfg.optim, cfg.parallel, env.device)
    return Trainable(model, build_optimizer(cfg.optim, model, fused), fused, channels_last, notes)
