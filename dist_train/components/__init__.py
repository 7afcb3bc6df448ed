"""Features that hook into the training loop and keep their state in the checkpoint
(base.py: the protocol). A run's components, in the order they are called after each step:
prune.sparsity's masks, train.ema, train.early_stop, checkpoint.keep_best,
logging.profile, then the user's callbacks."""

from __future__ import annotations

from typing import Any

from torch import nn

from dist_train.components.base import Component, ComponentError, Components
from dist_train.components.callbacks import build_callbacks
from dist_train.components.early_stop import EarlyStopping
from dist_train.components.ema import EMA
from dist_train.components.keep_best import KeepBest
from dist_train.components.profiler import Profiler
from dist_train.components.sparsity import build_sparsity
from dist_train.config import Config

__all__ = ["Component", "ComponentError", "Components", "build_components"]


def build_components(
    cfg: Config, model: nn.Module, rank: int, start_step: int, last_step: int, user_callbacks: list[Any] = ()
) -> Components:
    """`model` unwrapped (the strategy's wrapper left out), before a resume restores it."""
    components: list[Component] = [*build_sparsity(cfg, model, start_step, last_step)]
    if cfg.train.ema.decay is not None:
        components.append(EMA(cfg.train.ema, model))  # after the masks: it averages the pruned weights
    if cfg.train.early_stop.metric is not None:
        components.append(EarlyStopping(cfg.train.early_stop))
    if cfg.checkpoint.keep_best.metric is not None:
        components.append(KeepBest(cfg.checkpoint.keep_best))
    if cfg.logging.profile.start_step is not None:
        components.append(Profiler(cfg.logging.profile, cfg.run_dir, rank, start_step))
    components += build_callbacks(cfg.callbacks, list(user_callbacks))
    return Components(components)
