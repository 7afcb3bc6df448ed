"""train.ema: an exponential moving average of the weights, updated after every optimizer step.

The average is what the run is judged and shipped by: evaluation runs with it swapped in (and
so early stopping and best checkpoints judge it), and `dist-train eval`, `export`, `prune`,
`quantize` and `model.init_from` read it from a checkpoint (checkpoint.load_model, read_weights).
Training itself continues from the raw weights. Each rank averages the parameters it holds:
the whole tensors under DDP, its DTensor shard under FSDP and HSDP, so the average costs no
communication and is sharded like the model. It is saved through DCP beside the model (under
"ema"), resharded on a resume at another world size, and loaded back in place. Buffers
(BatchNorm's running statistics) are not averaged: evaluation uses the model's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dist_train.components.base import Component
from dist_train.config import EmaConfig


class EMA(Component):
    name = "ema"

    def __init__(self, cfg: EmaConfig, model: nn.Module) -> None:
        """`model` unwrapped; built before a resume loads the average in place."""
        self.cfg = cfg
        self.params: list[nn.Parameter] = []
        self.averages: list[torch.Tensor] = []
        by_param: dict[int, torch.Tensor] = {}
        # Every name a parameter has (a tied one has two, as in the model's state dict), each
        # naming the one average of that parameter.
        self.named: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) not in by_param:
                by_param[id(param)] = param.detach().clone()
                self.params.append(param)
                self.averages.append(by_param[id(param)])
            self.named[name] = by_param[id(param)]
        self.updates = 0
        self.restored = False
        self.notes = [
            f"ema: an average of the weights with decay {cfg.decay:g}{' (warm-up)' if cfg.warmup else ''}, "
            "evaluated and exported in their place"
        ]

    def on_start(self, run) -> None:
        if not self.restored:  # a fresh run, or one that turns the average on at a resume
            self._copy_from_params()

    @torch.no_grad()
    def _copy_from_params(self) -> None:
        for average, param in zip(self.averages, self.params, strict=True):
            average.copy_(param.detach())

    def decay(self) -> float:
        if not self.cfg.warmup:
            return self.cfg.decay
        return min(self.cfg.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def after_step(self, run, step: int) -> None:
        weight = 1.0 - self.decay()
        for average, param in zip(self.averages, self.params, strict=True):
            average.lerp_(param.detach(), weight)
        self.updates += 1

    @contextlib.contextmanager
    def eval_weights(self, run) -> Iterator[None]:
        with torch.no_grad():
            raw = [param.detach().clone() for param in self.params]
            for param, average in zip(self.params, self.averages, strict=True):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, raw, strict=True):
                    param.copy_(saved)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.named

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.restored = state["updates"], True
