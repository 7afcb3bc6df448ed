"""What the tuning tools (the LR range test, the batch-size search) train with: a Run made of the
training's own parts but with no checkpoints, no logging and no stop signals, and the loop's
optimizer update (run.optimizer_step) without its bookkeeping. The step itself is run.forward_backward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from dist_train.config import Config, check_device
from dist_train.data import DataPipeline
from dist_train.distributed import DistEnv
from dist_train.logger import RunLogger
from dist_train.parallel import Strategy, build_strategy
from dist_train.process_settings import set_cuda_math
from dist_train.run import Run, Trainable, optimizer_step
from dist_train.tasks import Task


def tool_strategy(cfg: Config, env: DistEnv) -> Strategy:
    """The strategy and device settings a tool trains with, as training sets them up."""
    check_device(cfg, env.device.type == "cuda")
    strategy = build_strategy(cfg.parallel, env, cfg.train.precision)
    if env.device.type == "cuda":
        set_cuda_math(cfg.train)
    return strategy


def tool_run(
    cfg: Config,
    env: DistEnv,
    strategy: Strategy,
    data: DataPipeline,
    trainable: Trainable,
    task: Task,
    lr_factor: Callable[[int], float],
) -> Run:
    """A Run for a tool: every parameter group's lr is its configured lr x lr_factor(step), so
    optim.lr_multipliers' ratios hold; the config's own schedule is not used."""
    scheduler = LambdaLR(trainable.optimizer, lr_factor)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
    logger = RunLogger(cfg, cfg.run_dir, False, "", 0, 0)  # disabled: writes nothing, anywhere
    model, optimizer, layout = trainable.model, trainable.optimizer, trainable.channels_last
    return Run(cfg, env, model, strategy, optimizer, scheduler, scaler, data, task, logger, None, None, layout)


def optimizer_update(run: Run, step_loss: torch.Tensor) -> None:
    """After forward_backward: training's own optimizer update (run.optimizer_step), without the
    non-finite agreement, a collective that a trial must not wait in."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer_step(run, params, step_loss, measure_norm=False, skip_nonfinite=False)
