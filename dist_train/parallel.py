"""Parallel strategies: each owns wrapping, the no-sync context and access to the plain model,
so the training loop never branches on which one is in use."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_train.config import ConfigError, ParallelConfig
from dist_train.distributed import DistEnv


class SingleProcess:
    name = "none"

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        return contextlib.nullcontext()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model


class DDP:
    name = "ddp"

    def __init__(self, env: DistEnv, bucket_cap_mb: float) -> None:
        self.env, self.bucket_cap_mb = env, bucket_cap_mb

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.env.is_distributed:
            return model  # DDP needs a process group; a lone process trains the plain model.
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        # gradient_as_bucket_view: gradients live in the all-reduce buckets, saving a copy.
        return DistributedDataParallel(
            model, device_ids=device_ids, bucket_cap_mb=self.bucket_cap_mb, gradient_as_bucket_view=True
        )

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        # Forward and backward must both run inside no_sync for the all-reduce to be skipped.
        if enabled or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model


def check_world_size(strategy: str, world_size: int) -> None:
    if strategy == "none" and world_size > 1:
        raise ConfigError(
            f"parallel.strategy=none cannot train with {world_size} processes "
            "(each would train its own model); use parallel.strategy=ddp"
        )


def build_strategy(cfg: ParallelConfig, env: DistEnv) -> SingleProcess | DDP:
    check_world_size(cfg.strategy, env.world_size)
    if cfg.strategy == "ddp":
        return DDP(env, cfg.bucket_cap_mb)
    return SingleProcess()
