"""Global magnitude pruning (prune.*, `dist-train prune`): masks over the weights of every Linear
and Conv layer, re-applied after every optimizer step so pruned weights stay exactly zero.

The masks are plain tensors beside the model, not torch.nn.utils.prune's weight_orig/weight_mask
reparametrisation: checkpoints, exports and model.init_from keep the model's own parameter
names. They are not saved either: after every step a masked weight is exactly 0.0, so on resume
(any world size, any strategy: DCP reshards the weights) each rank rebuilds its mask as the
nonzeros of its shard. A kept weight that lands on exactly 0.0 itself would be frozen at zero
from then on; with fp32 master weights that has probability ~0 and pruning it costs nothing.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dist_train import compress_report
from dist_train.config import Config, ConfigError, PruneConfig, UserError

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


class NoSparsity:
    """The default: every weight may move."""

    notes: list[str] = []

    def after_step(self, step: int) -> None:
        pass


class Sparsity:
    """Masks over `weights` (DTensor shards under FSDP: each rank masks the shard it holds)."""

    def __init__(self, weights: list[nn.Parameter], cfg: PruneConfig, start_step: int, last_step: int) -> None:
        self.weights, self.cfg = weights, cfg
        self.end_step = cfg.end_step or last_step
        self.total = sum(w.numel() for w in weights)  # a DTensor's numel is the whole tensor's
        # What the weights' zeros say: the masks as a checkpoint left them (all ones at a fresh start).
        self.masks = [w.detach() != 0 for w in weights]
        # A checkpoint was saved after its step's masks were applied: nothing to recompute then.
        self.pruned = self.target(start_step) if start_step > 0 else None
        self.after_step(start_step)
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

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called once after each optimizer step: raise the sparsity when the schedule says so,
        then zero the pruned weights again (the update moved them: momentum, weight decay)."""
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
            [_full(w.detach().abs() * m).flatten() for w, m in zip(self.weights, self.masks, strict=True)]
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


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def prunable_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weight of every Linear and Conv layer, each once (a weight tied to an embedding too)."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, PRUNABLE) and isinstance(module.weight, nn.Parameter):
            found.setdefault(id(module.weight), module.weight)
    return list(found.values())


def build_sparsity(cfg: Config, model: nn.Module, start_step: int, last_step: int) -> NoSparsity | Sparsity:
    """The run's masks, on every rank, once its weights are final (init_from or a checkpoint)."""
    if cfg.prune.sparsity is None:
        return NoSparsity()
    weights = prunable_weights(model)
    if not weights:
        raise ConfigError(f"prune.sparsity: model {cfg.model.name} has no Linear or Conv layer weights to prune")
    return Sparsity(weights, cfg.prune, start_step, last_step)


def write_report(
    cfg: Config, timing_runs: int = 30, max_accuracy_drop: float = 0.01, force: bool = False
) -> compress_report.Report:
    """The compression report of a pruned run (compress_report): its source checkpoint (the
    run's model.init_from) against its newest checkpoint, both exported as safetensors into
    RUN_DIR/compress/, measured on the CPU; the table is printed and written there. Unstructured
    zeros keep the file as large and the dense forward as slow: the table shows it.

    A pruned model that lost more than max_accuracy_drop is flagged, and its export is removed
    again unless forced (UserError after the report is written); the run's checkpoints stay, so
    the same command with more train.max_steps fine-tunes it on."""
    from pathlib import Path

    from safetensors.torch import save_model

    from dist_train import checkpoint
    from dist_train.export import weights_checkpoint

    source = weights_checkpoint(Path(cfg.model.init_from))
    pruned = weights_checkpoint(cfg.run_dir)
    original, validation, _ = compress_report.cpu_validation(cfg, lambda model: checkpoint.load_model(source, model))
    result = copy.deepcopy(original)
    checkpoint.load_model(pruned, result)
    out = cfg.run_dir / "compress"
    out.mkdir(exist_ok=True)
    files = {name: out / f"{name}.safetensors" for name in ("source", "pruned")}
    save_model(original, str(files["source"]))
    save_model(result, str(files["pruned"]))
    report = compress_report.compare(
        (f"source ({source.name})", original, files["source"]),
        [(f"pruned {cfg.prune.sparsity:g} ({pruned.name})", result, files["pruned"])],
        validation,
        max_accuracy_drop,
        timing_runs,
    )
    print(compress_report.table(report), end="")
    compress_report.write(report, out)
    if report.rows[-1].flagged and not force:
        files["pruned"].unlink()
        lost = -report.rows[-1].accuracy_change
        raise UserError(
            f"pruned {cfg.prune.sparsity:g} loses {lost:.4f} accuracy, more than --max-accuracy-drop "
            f"{max_accuracy_drop:g}; {files['pruned']} not written (--force writes it; a larger "
            "train.max_steps continues the fine-tuning)"
        )
    return report
