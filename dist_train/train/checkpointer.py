"""The Checkpointer: what a run saves, declared once; when it saves, and how (sync or async).

The train state is a declaration, `stateful`: named parts that each give a `state_dict()` and
take it back with `load_state_dict()` (the LR schedule's position, the loss scaler, the data
position, and whatever a component adds). A save writes each part's state under its name, and
a resume hands each part back the state saved under that name: one list, so a part cannot be
saved and forgotten on resume. Beside them `record` holds what a checkpoint says about its run
(the config as written, the plan, the W&B run id) and is never loaded back into anything.
Model and optimizer go through DCP (checkpoint/store.py), resharded to any world size, and so do
`tensors`, more sharded state under its own names (train.ema's average).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from dist_train import checkpoint
from dist_train.checkpoint.async_save import AsyncCheckpointer
from dist_train.config import CheckpointConfig
from dist_train.distributed import DistEnv
from dist_train.optim import keep_kernel_choice, load_scheduler_position
from dist_train.process_settings import seed_everything


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SchedulePosition:
    """The LR scheduler as checkpointed: its position, restored on the resumed run's own
    schedule (a longer train.max_steps stretches the rest of it; optim.load_scheduler_position)."""

    def __init__(self, scheduler: LRScheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_scheduler_position(self.scheduler, state)


class Checkpointer:
    """Saves at checkpoint.every_steps, at the end of the invocation and on a stop signal;
    the last save of an invocation is synchronous, so a run ends with every checkpoint whole."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        root: Path,
        env: DistEnv,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        stateful: dict[str, Stateful],
        record: dict[str, Any],
        tensors: Callable[[], dict[str, dict[str, torch.Tensor]]] = dict,
    ) -> None:
        self.cfg, self.root, self.env = cfg, root, env
        self.model, self.optimizer = model, optimizer
        self.stateful, self.record, self.tensors = stateful, record, tensors
        self.saver: AsyncCheckpointer | None = None
        self.keepers: list[Callable[[], frozenset[int]]] = []

    def keep_also(self, steps: Callable[[], frozenset[int]]) -> None:
        """Checkpoints whose step `steps()` names at a save are kept beyond checkpoint.keep_last
        (checkpoint.keep_best's)."""
        self.keepers.append(steps)

    def start(self, timeout_s: float, message: Callable[[str], None]) -> None:
        """Collective, once the run is set up: checkpoint.async_save's writer and its own group."""
        if self.cfg.async_save:
            self.saver = AsyncCheckpointer(self.env, timeout_s, message)

    def due(self, step: int, end_step: int, stopping: bool) -> bool:
        every = self.cfg.every_steps
        return bool(every and step % every == 0) or step == end_step or stopping

    def save(self, step: int, final: bool) -> Path:
        """Collective. `final`: the invocation's last save, written before this returns."""
        state = {"step": step, **{name: part.state_dict() for name, part in self.stateful.items()}, **self.record}
        args = (self.root, step, state, self.model, self.optimizer)
        also_keep = frozenset().union(*(steps() for steps in self.keepers))
        if self.saver is not None and not final:
            return self.saver.save(*args, self.cfg.keep_last, also_keep, self.tensors())
        if self.saver is not None:
            self.saver.drain()
        return checkpoint.save(*args, self.env, self.cfg.keep_last, also_keep, self.tensors())

    def restore(self, path: Path, state: dict[str, Any], fused: bool, same_ranks: bool, seed: int) -> None:
        """Collective. Model and optimizer from DCP (any world size), then every declared part
        from its own entry. RNG streams continue rank by rank when the world size is the same;
        otherwise ranks no longer map onto saved streams and get fresh ones, distinct per step."""
        checkpoint.load_model_and_optimizer(path, self.model, self.optimizer, self.tensors())
        keep_kernel_choice(self.optimizer, fused)
        for name, part in self.stateful.items():
            if name in state or not getattr(part, "missing_ok", False):
                part.load_state_dict(state[name])
        if same_ranks:
            checkpoint.set_rng_state(checkpoint.load_rng_state(path, self.env.rank))
        else:
            seed_everything(hash((seed, self.env.rank, state["step"])) % 2**31)

    def close(self) -> None:
        """After a failure too: no write is left running while the process group goes."""
        if self.saver is not None:
            self.saver.close()
