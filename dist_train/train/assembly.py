"""What a run is made of (Run) and the one function that builds it (assemble), for training and
for every tool that trains or evaluates a run's model: find-lr, find-batch, eval, prune and
quantize. Each takes the same strategy, data pipeline, model, optimizer, schedule, scaler and
task, so a tool measures the model training would train."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from dist_train import finetune
from dist_train.components import Components
from dist_train.config import Config, check_device
from dist_train.data import Batch, DataPipeline, Datasets, build_pipeline
from dist_train.distributed import DistEnv, broadcast_module, use_channels_last
from dist_train.logger import RunLogger
from dist_train.models import build_model
from dist_train.optim import build_optimizer, build_scheduler, check_fused, use_fused
from dist_train.parallel import SingleProcess, Strategy, build_strategy, prepare_blocks
from dist_train.preemption import StopRequest
from dist_train.process_settings import ScheduledGC, seed_everything, set_cuda_math
from dist_train.tasks import LossFn, Task, build_task
from dist_train.train.checkpointer import Checkpointer
from dist_train.train.step import autocast


@dataclass
class UserParts:
    """What dist_train.fit was handed as Python objects; each wins over its name in the config."""

    model: nn.Module | None = None
    datasets: Datasets | None = None
    loss: LossFn | None = None
    callbacks: list[Any] = field(default_factory=list)  # the user's components, after the config's


@dataclass
class Run:
    """What a run is made of. The loop takes every part from here by name; training adds its
    checkpointer, components, logger and stop signals to what assemble() built."""

    cfg: Config
    env: DistEnv
    model: nn.Module  # as wrapped by the strategy
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    data: DataPipeline
    task: Task
    logger: RunLogger  # disabled (writes nothing) until training opens its run directory
    fused: bool  # the optimizer's kernel choice, kept over a checkpoint's on resume
    channels_last: bool  # inputs go to the device in the layout the model was given
    notes: list[str]  # what fine-tuning did, for the log
    checkpointer: Checkpointer | None = None  # None in a tool: it writes no checkpoints
    stop: StopRequest | None = None
    components: Components = field(default_factory=Components)  # hooked into the loop (components/)
    scheduled_gc: ScheduledGC = field(default_factory=lambda: ScheduledGC(0))  # collections at agreed steps

    @property
    def trained_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One record, to every component's on_log, on every rank: first the run's loggers
        (metrics.jsonl, the console, W&B, TensorBoard, MLflow on rank 0), then the others (a
        component's on_log must not log through here again)."""
        self.components.on_log(self, step, metrics)

    def train_mode(self) -> None:
        finetune.train_mode(self.model, self.cfg.model)

    def autocast(self) -> ContextManager:
        return autocast(self.cfg.train.precision, self.env.device, self.strategy)

    def inputs_to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inputs on the device as the model takes them (layout; uint8 images normalized there)."""
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        return self.data.inputs_to_device(inputs, memory_format=layout)


def device_strategy(cfg: Config, env: DistEnv, trains: bool = True) -> Strategy:
    """The device checks and math settings, and the strategy that wraps the model. Where nothing
    trains (evaluation) a replica needs no DDP, whose hooks serve gradients; FSDP stays, so a
    model too big for one device stays sharded."""
    check_device(cfg, env.device.type == "cuda")
    if env.device.type == "cuda":
        set_cuda_math(cfg.train)
    if not trains and cfg.parallel.strategy != "fsdp":
        return SingleProcess()
    return build_strategy(cfg.parallel, env, cfg.train.precision)


def fixed_lr(step: int) -> float:
    """lr_factor for a run whose lr does not change: a trial, or one that only evaluates."""
    return 1.0


def assemble(
    cfg: Config,
    env: DistEnv,
    strategy: Strategy,
    batch: Batch,
    datasets: Datasets | None = None,
    parts: UserParts | None = None,
    *,
    last_step: int = 1,
    lr_factor: Callable[[int], float] | None = None,
    resuming: bool = False,
) -> Run:
    """The run's parts, built in one order on every rank: seeded alike (identical initial weights
    and data order), then reseeded per rank for what differs by rank (dropout).

    `batch`: the step's batch (the plan's, or a tool's: a trial size, one sample to evaluate).
    `lr_factor`: every parameter group's lr is its configured lr x lr_factor(step), so
    optim.lr_multipliers' ratios hold (a tool's own schedule); None: the config's schedule
    over `last_step` steps. `resuming`: the weights come from elsewhere (a checkpoint, a
    trial), so model.init_from is not read."""
    parts = parts or UserParts()
    seed_everything(cfg.run.seed)  # the same on every rank: identical initial weights
    data = build_pipeline(cfg.data, env, batch, cfg.run.seed, datasets if datasets is not None else parts.datasets)
    trainable = build_trainable(cfg, env, strategy, data, parts.model, resuming)
    task = build_task(cfg.train, parts.loss)
    if lr_factor is None:
        scheduler = build_scheduler(cfg.schedule, trainable.optimizer, last_step)
    else:
        scheduler = LambdaLR(trainable.optimizer, lr_factor)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
    seed_everything(cfg.run.seed + env.rank)  # per-rank randomness (dropout) from here on
    logger = RunLogger(cfg, cfg.run_dir, False, "", 0, 0)  # disabled: writes nothing, anywhere
    return Run(
        cfg, env, trainable.model, strategy, trainable.optimizer, scheduler, scaler, data, task, logger,
        trainable.fused, trainable.channels_last, trainable.notes,
    )  # fmt: skip


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
