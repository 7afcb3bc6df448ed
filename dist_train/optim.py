"""Optimizers with decoupled weight-decay groups, and LR schedules stepped once per optimizer step."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from dist_train.config import ConfigError, OptimConfig, ParallelConfig, ScheduleConfig, resolve_auto
from dist_train.finetune import longest_match, unmatched_prefix_error, user_named_parameters


def param_groups(
    model: nn.Module, weight_decay: float, lr_multipliers: dict[str, float] | None = None, lr: float | None = None
) -> list[dict]:
    """Decay matrices and kernels; never biases or normalization weights (all 1-D parameters).

    Two groups (decay, no decay) at the optimizer's lr, then two per optim.lr_multipliers
    prefix (sorted) at lr x factor, each trainable parameter in the group of its longest
    matching prefix (`lr` is then required). Every group exists even when empty: the set depends on the config alone,
    never on the step, so a resumed optimizer always finds the groups it saved.
    """
    multipliers = lr_multipliers or {}
    prefixes = sorted(multipliers)
    members: dict[str | None, tuple[list, list]] = {prefix: ([], []) for prefix in [None, *prefixes]}
    for name, param in user_named_parameters(model):
        if param.requires_grad:
            decay, no_decay = members[longest_match(name, prefixes)]
            (decay if param.ndim >= 2 else no_decay).append(param)
    for prefix in prefixes:
        if not any(members[prefix]):
            raise unmatched_prefix_error(prefix, f"optim.lr_multipliers.{prefix}", model)
    groups = []
    for prefix, (decay, no_decay) in members.items():
        own_lr = {} if prefix is None else {"lr": lr * multipliers[prefix]}
        groups += [{"params": decay, "weight_decay": weight_decay, **own_lr}]
        groups += [{"params": no_decay, "weight_decay": 0.0, **own_lr}]
    return groups


def use_fused(cfg: OptimConfig, parallel: ParallelConfig, device: torch.device) -> bool:
    """optim.fused: `auto` fuses where the parameters live on a GPU and the kernel can run on them.
    There a fused step is one kernel launch per parameter group instead of several per tensor,
    and it reads GradScaler's inf flag on the device, where the unfused step syncs the host
    every step. Under FSDP an optimizer whose fused kernel DTensor cannot run (SGD) takes
    torch's foreach kernels instead; `true` there is refused by check_fused."""
    sharded = parallel.strategy == "fsdp"
    on_gpu = device.type == "cuda" and not (sharded and parallel.cpu_offload)
    return resolve_auto(cfg.fused, when_auto=on_gpu and (not sharded or fused_runs_on_dtensor(cfg.name)))


def check_fused(cfg: OptimConfig, parallel: ParallelConfig) -> None:
    """optim.fused=true with a kernel the strategy's parameters cannot take: one line, before
    any worker starts, rather than a NotImplementedError from inside the first step."""
    if cfg.fused is True and parallel.strategy == "fsdp" and not fused_runs_on_dtensor(cfg.name):
        raise ConfigError(
            f"optim.fused=true: torch {torch.__version__.split('+')[0]} has no fused {cfg.name} kernel for FSDP's "
            "sharded (DTensor) parameters; use optim.fused=auto (foreach kernels) or optim.name=adamw"
        )


FUSED_OPS = {"sgd": "_fused_sgd_", "adam": "_fused_adam_", "adamw": "_fused_adamw_"}


def fused_runs_on_dtensor(name: str) -> bool:
    """Whether DTensor has a sharding rule for this optimizer's fused kernel. Torch 2.6 to 2.14
    register one for Adam and AdamW only (torch/distributed/tensor/_ops/_pointwise_ops.py);
    asked of torch itself, so a release that adds SGD is used as soon as it is installed."""
    op = getattr(torch.ops.aten, FUSED_OPS[name]).default
    try:
        from torch.distributed.tensor import DTensor

        propagator = DTensor._op_dispatcher.sharding_propagator
    except (ImportError, AttributeError):  # DTensor's internals moved: what 2.6-2.14 register
        return name in ("adam", "adamw")
    registries = ("op_strategy_funcs", "op_single_dim_strategy_funcs", "op_to_rules")  # where each release keeps them
    return any(op in getattr(propagator, registry, {}) for registry in registries)


def build_optimizer(cfg: OptimConfig, model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.lr_multipliers, cfg.lr)
    kernels = {"fused": fused or None}  # None: torch's default (foreach where it can)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kernels)
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "adam":
        # Adam's weight_decay is L2 added to the gradient (coupled), as in torch.optim.Adam.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **kernels)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **kernels)


def keep_kernel_choice(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After loading a checkpoint: load_state_dict replaces each group's settings with the
    saved ones, `fused` included, so a run resumed on a GPU from a CPU checkpoint would
    silently keep the CPU's choice."""
    for group in optimizer.param_groups:
        group["fused"] = fused or None


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """LR factor after `step` optimizer steps: linear warmup, then the named decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
    # cosine
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    if cfg.name == "onecycle":
        if cfg.warmup_steps >= total_steps:
            raise ConfigError(
                f"schedule.warmup_steps={cfg.warmup_steps} must be < the run's {total_steps} steps for onecycle"
            )
        lrs = [g["lr"] for g in optimizer.param_groups]
        pct_start = cfg.warmup_steps / total_steps if cfg.warmup_steps else 0.3
        # cycle_momentum needs a momentum/beta1 to cycle; plain SGD without momentum has none.
        has_momentum = "betas" in optimizer.defaults or optimizer.defaults.get("momentum", 0) > 0
        return OneCycleLR(
            optimizer, max_lr=lrs, total_steps=total_steps, pct_start=pct_start, cycle_momentum=has_momentum
        )

    # A plain function: LambdaLR then keeps nothing but last_epoch in its state dict, which
    # therefore loads with weights_only=True.
    def multiplier(step: int) -> float:
        return lr_multiplier(cfg, step, total_steps)

    return LambdaLR(optimizer, multiplier)


def load_scheduler_position(scheduler: LRScheduler, saved: dict) -> None:
    """Restore where the schedule stands, not its shape.

    Every schedule here is a pure function of the step count and the config, so only the
    position is taken from the checkpoint. That lets a resumed run change train.max_steps
    (OneCycleLR's saved state would otherwise keep its old total and fail past it).
    """
    state = scheduler.state_dict()
    for key in ("last_epoch", "_step_count", "_last_lr"):
        state[key] = saved[key]
    scheduler.load_state_dict(state)
