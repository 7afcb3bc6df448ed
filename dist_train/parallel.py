"""Parallel strategies: each owns wrapping, the no-sync context and mixed precision where it
applies, so the training loop never branches on which one is in use. Checkpoints need no
strategy code: DCP's get_state_dict/set_state_dict speak every wrapping."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_train.config import ConfigError, ParallelConfig
from dist_train.distributed import DistEnv

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class SingleProcess:
    name = "none"
    handles_precision = False  # the loop's autocast does mixed precision

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        return contextlib.nullcontext()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)  # frees the gradients until backward needs them

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def describe_mesh(self) -> str | None:
        """The device mesh as one line for the start of the log; None without one."""
        return None


class DDP(SingleProcess):
    name = "ddp"

    def __init__(self, env: DistEnv, bucket_cap_mb: float) -> None:
        self.env, self.bucket_cap_mb = env, bucket_cap_mb

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        # gradient_as_bucket_view: gradients live in the all-reduce buckets, saving a copy.
        # broadcast_buffers=False: no broadcast of BatchNorm statistics before every forward;
        # the loop gives every rank rank 0's buffers before it evaluates, where they matter.
        return DistributedDataParallel(
            model,
            device_ids=device_ids,
            bucket_cap_mb=self.bucket_cap_mb,
            gradient_as_bucket_view=True,
            broadcast_buffers=False,
        )

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        # The gradients are views into DDP's buckets: zeroed in place, backward accumulates
        # straight into the buckets; set to None, every step would allocate new gradients
        # and DDP would copy them into the buckets.
        optimizer.zero_grad(set_to_none=False)

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        # Forward and backward must both run inside no_sync for the all-reduce to be skipped.
        if enabled or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks a model declares (`blocks`: GPT) or that we know (ResNet stages)."""
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):
        return list(model.blocks)
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    return [s for s in stages if s is not None]


def prepare_blocks(model: nn.Module, activation_checkpointing: bool, compile: bool) -> nn.Module:
    """Per repeated block, in the order FSDP needs them: activation checkpointing, then
    torch.compile. Both replace the block's forward, so parameter names (and checkpoints)
    stay those of the plain model, and FSDP's hooks stay outside the compiled region."""
    units = shard_units(model)
    if not units and (activation_checkpointing or compile):
        warnings.warn(
            f"{type(model).__name__} names no repeated blocks: activation checkpointing is off"
            + (", torch.compile applies to the whole model" if compile else ""),
            stacklevel=2,
        )
        if compile:
            model.forward = torch.compile(model.forward)
        return model
    for block in units:
        forward = block.forward
        if activation_checkpointing:
            forward = _recomputed_in_backward(forward)
        if compile:
            forward = torch.compile(forward)
        block.forward = forward
    return model


def _recomputed_in_backward(forward: Callable) -> Callable:
    from torch.utils.checkpoint import checkpoint

    def checkpointed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed


class FSDP(SingleProcess):
    """FSDP2: each block is its own fully_shard unit, then the root; parameters are DTensors."""

    name = "fsdp"

    def __init__(self, env: DistEnv, cfg: ParallelConfig, precision: str, mesh: DeviceMesh | None = None) -> None:
        self.env, self.cfg, self.precision, self.mesh = env, cfg, precision, mesh
        # bf16 params and compute with fp32 gradient reduction; FSDP casts, so no autocast.
        self.handles_precision = precision == "bf16"
        self._last_micro_batch: bool | None = None  # what gradient_sync last set

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        # No mesh: fully_shard's default, a 1-D mesh over the whole world (plain FSDP).
        common: dict = {} if self.mesh is None else {"mesh": self.mesh}
        if self.cfg.cpu_offload:
            # Pinned host memory speeds copies to a GPU and needs one.
            common["offload_policy"] = CPUOffloadPolicy(pin_memory=self.env.device.type == "cuda")
        kwargs = {**common, "reshard_after_forward": self.cfg.reshard_after_forward}
        if self.handles_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            # BatchNorm keeps fp32 running statistics, which its kernels refuse beside bf16
            # weights: its weights stay fp32 in a unit of their own (tiny, so kept gathered),
            # and take the bf16 activations as they come, as under autocast.
            norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if norms:
                fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, cast_forward_inputs=False)
                fully_shard(norms, **common, mp_policy=fp32, reshard_after_forward=False)
        units = shard_units(model)
        if not units and self.env.is_main:
            warnings.warn(
                f"{type(model).__name__} names no repeated blocks (a `blocks` ModuleList): FSDP shards it as one "
                "unit, so all parameters are gathered at once",
                stacklevel=2,
            )
        for unit in units:
            fully_shard(unit, **kwargs)
        # The root stays gathered from forward to backward: it runs first in backward (head,
        # tied embedding), so freeing it would only gather it again at once. True here would
        # also switch off FSDP2's root exemption.
        fully_shard(model, **{**kwargs, "reshard_after_forward": False})
        return model

    def gradient_sync(self, model: nn.Module, enabled: bool) -> ContextManager:
        last_micro_batch = enabled
        if last_micro_batch != self._last_micro_batch:  # walks every module: only on a change
            # By default no reduce-scatter on non-final micro-batches: unsharded gradients
            # accumulate locally, trading memory for k-fold less traffic; sync_every_micro_batch
            # trades back. Parameters gathered for a non-final backward stay gathered for the
            # next micro-batch's forward: one all-gather per micro-batch, not two, for the
            # memory of the unsharded parameters between micro-batches.
            model.set_requires_gradient_sync(last_micro_batch or self.cfg.sync_every_micro_batch)
            if self.hybrid:
                # HSDP with sync_every_micro_batch: each micro-batch's reduce-scatter stays
                # within the node; the all-reduce across nodes waits for the sum of the shards.
                model.set_requires_all_reduce(last_micro_batch)
            model.set_reshard_after_backward(last_micro_batch)
            self._last_micro_batch = last_micro_batch
        return contextlib.nullcontext()

    @property
    def hybrid(self) -> bool:
        """HSDP: the parameters are replicated over a dp_replicate dimension of the mesh."""
        return self.mesh is not None and "dp_replicate" in (self.mesh.mesh_dim_names or ())

    def describe_mesh(self) -> str:
        if self.mesh is None:
            return f"mesh: dp_shard={self.env.world_size} (FSDP)"
        named = zip(self.mesh.mesh_dim_names, self.mesh.shape, strict=True)
        sizes = " x ".join(f"{name}={size}" for name, size in named)
        return f"mesh: {sizes} (HSDP)" if self.hybrid else f"mesh: {sizes}"


def check_world_size(cfg: ParallelConfig, world_size: int, local_world_size: int | None = None) -> None:
    """The world-size-dependent checks, before any worker starts (launcher) and in each worker.
    local_world_size: processes per node (None: all on one node)."""
    if cfg.strategy == "none" and world_size > 1:
        raise ConfigError(
            f"parallel.strategy=none cannot train with {world_size} processes "
            "(each would train its own model); use parallel.strategy=ddp"
        )
    if cfg.strategy == "fsdp":
        mesh_shape(cfg, world_size, local_world_size)


# FSDP over gloo needs torch 2.8: in 2.7 gloo's reduce-scatter sums where FSDP asks for the mean
# (gradients world-size times too large, silently) and its all-reduce refuses the mean HSDP asks
# for; 2.6's FSDP calls a CPU stream method that does not exist yet.
FSDP_OVER_GLOO_SINCE = (2, 8)
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])


def check_backend(cfg: ParallelConfig, cuda: bool) -> None:
    """What the process group's backend can carry, before any worker starts and in each worker."""
    over_gloo = cfg.backend == "gloo" or not cuda
    if cfg.strategy == "fsdp" and over_gloo and TORCH_VERSION < FSDP_OVER_GLOO_SINCE:
        where = "parallel.backend=gloo" if cuda else "a CPU (gloo)"
        raise ConfigError(
            f"parallel.strategy=fsdp on {where} needs torch >= 2.8, this is {torch.__version__.split('+')[0]}: "
            "its gloo reduce-scatter sums gradients FSDP means to average; use ddp, or a newer torch"
        )


def mesh_shape(cfg: ParallelConfig, world_size: int, local_world_size: int | None = None) -> dict[str, int]:
    """The named data-parallel mesh dimensions and their sizes, outermost (slowest links) first.
    A new parallelism (tp) is one more name here, innermost, and a divisor of the shard size."""
    replicate = cfg.replicate_degree
    if replicate == "auto":
        per_node = local_world_size or world_size
        if world_size % per_node:
            raise ConfigError(
                f"parallel.replicate_degree=auto needs the same number of processes on every node; "
                f"{world_size} processes are not a multiple of {per_node} per node"
            )
        replicate = world_size // per_node
    if world_size % replicate:
        raise ConfigError(
            f"parallel.replicate_degree={replicate} does not divide the world size of {world_size} processes"
        )
    return {"dp_replicate": replicate, "dp_shard": world_size // replicate}


def build_mesh(cfg: ParallelConfig, env: DistEnv, local_world_size: int | None = None) -> DeviceMesh | None:
    """The device mesh FSDP shards over, or None for fully_shard's default 1-D mesh over the
    world: plain FSDP (replicate_degree 1) takes exactly the code path it took before meshes."""
    if cfg.strategy != "fsdp":
        return None
    shape = mesh_shape(cfg, env.world_size, local_world_size)
    if shape["dp_replicate"] == 1:
        return None
    # Both dimensions stay, even a dp_shard of 1 (pure replication): fully_shard shards over
    # any 1-D mesh and replicates only over the first dimension of a 2-D one.
    from torch.distributed.device_mesh import init_device_mesh

    # Ranks are laid out row-major: consecutive ranks (one node's) share a dp_shard group, so
    # the all-gathers and reduce-scatters stay on the node's fast links (NVLink).
    return init_device_mesh(env.device.type, tuple(shape.values()), mesh_dim_names=tuple(shape))


Strategy = SingleProcess  # the interface every strategy implements


def build_strategy(cfg: ParallelConfig, env: DistEnv, precision: str = "fp32") -> SingleProcess:
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))  # torchrun sets it
    check_world_size(cfg, env.world_size, local_world_size)
    check_backend(cfg, env.device.type == "cuda")
    if cfg.strategy == "ddp" and env.world_size > 1:
        # With one process DDP only adds its hooks and bucket copies (about 10% of a small
        # model's step on a CPU): it trains as `none`, whose checkpoints are the same.
        return DDP(env, cfg.bucket_cap_mb)
    if cfg.strategy == "fsdp":
        if not env.is_distributed:
            raise ConfigError("parallel.strategy=fsdp needs a process group: start it with dist-train launch")
        return FSDP(env, cfg, precision, build_mesh(cfg, env, local_world_size))
    return SingleProcess()
