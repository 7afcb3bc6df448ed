"""Global magnitude pruning in the loop (prune.*): masks over the weights of every Linear
and Conv layer, re-applied after every optimizer step so pruned weights stay exactly zero.

The masks are plain tensors beside the model, not torch.nn.utils.prune's weight_orig/weight_mask
reparametrisation: checkpoints, exports and model.init_from keep the model's own parameter
names. They are not saved either: after every step a masked weight is exactly 0.0, so on resume
(any world size, any strategy: DCP reshards the weights) each rank rebuilds its mask as the
nonzeros of its shard. A kept weight that lands on exactly 0.0 itself would be frozen at zero
from then on; with fp32 master weights that has probability ~0 and pruning it costs nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_train.components.base import Component
from dist_train.config import Config, ConfigError, PruneConfig
from dist_train.efficiency import full_tensor

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


class Sparsity(Component):
    """Masks over `weights` (DTensor shards under FSDP: each rank masks the shard it holds).
    A component with no state of its own: the weights' zeros are its state."""

    name = "sparsity"

    def __init__(self, weights: list[nn.Parameter], cfg: PruneConfig, start_step: int, last_step: int) -> None:
        self.weights, self.cfg = weights, cfg
        self.end_step = cfg.end_step or last_step
        self.start_step = start_step
        self.total = sum(w.numel() for w in weights)  # a DTensor's numel is the whole tensor's
        schedule = (
            "at once"
            if cfg.schedule == "oneshot"
            else f"gradually (cubic) from step {cfg.start_step} to {self.end_step}"
        )
        self.notes = [
            f"prune: {cfg.sparsity:.0%} of {self.total:,} weights in {len(weights)} Linear/Conv layers "
            f"(global magnitude) set to zero {schedule}, kept zero after every step"
        ]

    def target(self, step: int) -> int:
        """How many weights are zero after `step`'s optimizer step (a Python int: no host sync)."""
        fraction = self.cfg.sparsity
        if self.cfg.schedule == "gradual":
            progress = min(max((step - self.cfg.start_step) / (self.end_step - self.cfg.start_step), 0.0), 1.0)
            fraction *= 1 - (1 - progress) ** 3
        return round(fraction * self.total)

    def on_start(self, run) -> None:
        """Once the weights are final (init_from or a checkpoint): the masks their zeros say (all
        ones at a fresh start). A checkpoint was saved after its step's masks were applied:
        nothing to recompute then."""
        self.masks = [w.detach() != 0 for w in self.weights]
        self.pruned = self.target(self.start_step) if self.start_step > 0 else None
        self.apply(self.start_step)

    def after_step(self, run, step: int) -> None:
        self.apply(step)

    @torch.no_grad()
    def apply(self, step: int) -> None:
        """Raise the sparsity when the schedule says so, then zero the pruned weights again
        (each optimizer step moves them: momentum, weight decay)."""
        pruned = self.target(step)
        if pruned != self.pruned:
            self._prune(pruned)
            self.pruned = pruned
        for weight, mask in zip(self.weights, self.masks, strict=True):
            weight.mul_(mask)

    def _prune(self, count: int) -> None:
        """New masks keeping all but the `count` smallest magnitudes over every weight together
        (already pruned ones score 0, so they stay pruned). Every rank sorts the same whole
        tensors, stably, so ties fall the same way on any world size."""
        scores = torch.cat(
            [full_tensor(w.detach().abs() * m).flatten() for w, m in zip(self.weights, self.masks, strict=True)]
        )
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[torch.argsort(scores, stable=True)[:count]] = False
        pieces = keep.split([w.numel() for w in self.weights])
        masks = []
        for weight, old, piece in zip(self.weights, self.masks, pieces, strict=True):
            mask = piece.view(weight.shape)
            if hasattr(weight, "device_mesh"):  # this rank's slice of the whole mask: no communication
                mask = torch.distributed.tensor.distribute_tensor(
                    mask, weight.device_mesh, weight.placements, src_data_rank=None
                )
            masks.append(mask & old)  # more zeros than `count` already (a pruned source) stay zero
        self.masks = masks


def prunable_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weight of every Linear and Conv layer, each once (a weight tied to an embedding too)."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, PRUNABLE) and isinstance(module.weight, nn.Parameter):
            found.setdefault(id(module.weight), module.weight)
    return list(found.values())


def build_sparsity(cfg: Config, model: nn.Module, start_step: int, last_step: int) -> list[Sparsity]:
    """prune.sparsity's component (none when it is off); its masks are made at on_start."""
    if cfg.prune.sparsity is None:
        return []
    weights = prunable_weights(model)
    if not weights:
        raise ConfigError(f"prune.sparsity: model {cfg.model.name} has no Linear or Conv layer weights to prune")
    return [Sparsity(weights, cfg.prune, start_step, last_step)]
