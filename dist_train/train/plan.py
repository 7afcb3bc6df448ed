"""A run's plan: everything derived from the config, decided once before any part is built.

The config stays what the user wrote (validated, frozen). The plan says how the run carries it
out here: whether and from where it resumes, the step's batch (micro-batch, accumulation,
global batch: data.batch_size=auto searched or kept from the checkpoint, train.global_batch
split, the accumulation that keeps a resumed run's global batch on another world size), the
steps per epoch, the run's last step and where this invocation stops. Every consumer reads it
from here; a checkpoint records it beside the config.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_train import checkpoint
from dist_train.checkpoint import CheckpointError
from dist_train.config import Config, to_dict
from dist_train.data import Batch, Datasets, total_steps
from dist_train.distributed import DistEnv, on_rank0
from dist_train.parallel import Strategy
from dist_train.train.assembly import UserParts
from dist_train.train.batch_search import resolve_batch

# What must not change between the run that wrote a checkpoint and the run resuming it.
# parallel.strategy may change: model and optimizer state are stored by parameter name.
# model.freeze and optim.lr_multipliers fix the optimizer's parameter groups; prune.sparsity
# and prune.schedule the masks, rebuilt on resume from the weights' zeros.
RESUME_INVARIANTS = (
    *("data.dataset", "model.name", "optim.name", "train.loss", "model.freeze", "optim.lr_multipliers"),
    *("prune.sparsity", "prune.schedule"),
)


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from and the training state it holds."""

    path: Path
    state: dict[str, Any]  # train_state.pt: step, scheduler, scaler, data position, ...

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def world_size(self) -> int:
        return self.state["world_size"]


@dataclass(frozen=True)
class Plan:
    batch: Batch
    steps_per_epoch: int
    last_step: int  # the run's last optimizer step (train.max_steps / max_epochs)
    end_step: int  # where this invocation stops: the last step, or train.stop_at_step before it
    resume: Resume | None
    device: str  # this rank's, e.g. cuda:0 (cpu: ranks share the host)
    strategy: str  # as built: none, ddp or fsdp (hsdp and fsdp_cpu_offload are fsdp with options)

    @property
    def start_step(self) -> int:
        return 0 if self.resume is None else self.resume.step

    @property
    def world_changed(self) -> bool:
        """Resumed on another number of processes: the accumulation keeps the global batch."""
        return self.resume is not None and self.resume.world_size != self.batch.world_size

    def describe(self) -> list[str]:
        """What the run log says about the plan."""
        lines = []
        if self.resume is not None:
            epoch = self.resume.state["data"]["epoch"]
            lines.append(f"resumed from {self.resume.path} at step {self.start_step} (epoch {epoch})")
        if self.world_changed:
            lines.append(
                f"written by {self.resume.world_size} processes, resumed on {self.batch.world_size}: "
                f"train.grad_accum_steps {self.batch.accum} keeps the global batch of {self.batch.global_batch}"
            )
        return lines

    def of_the_run(self) -> dict[str, Any]:
        """What a checkpoint records: the batch and steps the run trains with, the same in a
        resumed run as in an uninterrupted one (not where this invocation started or stops)."""
        return {
            "world_size": self.batch.world_size,
            "micro_batch": self.batch.micro,
            "grad_accum_steps": self.batch.accum,
            "global_batch": self.batch.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "last_step": self.last_step,
        }

    def to_dict(self) -> dict[str, Any]:
        """As RUN_DIR/plan.json records this invocation's plan."""
        return {
            **self.of_the_run(),
            "start_step": self.start_step,
            "end_step": self.end_step,
            "resume_from": None if self.resume is None else str(self.resume.path),
            "device": self.device,
            "strategy": self.strategy,
        }


def make_plan(cfg: Config, env: DistEnv, strategy: Strategy, datasets: Datasets, parts: UserParts) -> Plan:
    """The plan for `cfg` on this process group, the same on every rank (call it on all):
    data.batch_size=auto runs its search here, on every rank, unless a checkpoint recorded it."""
    resume = _resume(cfg, env)
    state = None if resume is None else resume.state
    batch = resolve_batch(cfg, env, strategy, state, parts, datasets)
    if resume is not None:
        batch = check_compatible(resume.state, cfg, batch, resume.path)
    steps_per_epoch = len(datasets.train) // batch.global_batch
    last_step = total_steps(cfg.train.max_steps, cfg.train.max_epochs, steps_per_epoch)
    end_step = min(last_step, cfg.train.stop_at_step or last_step)
    return Plan(batch, steps_per_epoch, last_step, end_step, resume, str(env.device), strategy.name)


def _resume(cfg: Config, env: DistEnv) -> Resume | None:
    """checkpoint.resume decided: rank 0 looks, every rank reads the same checkpoint's state."""
    mode = cfg.checkpoint.resume
    if mode == "never" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        mode = "auto"  # torchrun restarted this very run after a failure: continue it
    root = cfg.run_dir / "checkpoints"
    path = on_rank0(env, lambda: checkpoint.resolve_resume(mode, root))
    return None if path is None else Resume(path, checkpoint.load_train_state(path))


def check_compatible(state: dict[str, Any], cfg: Config, batch: Batch, source: Path) -> Batch:
    """One-line errors for a resume that could not continue the same run; returns the batch to
    resume with, whose accumulation keeps the global batch when the world size changed."""
    saved, current = state["config"], to_dict(cfg)  # saved: the config as the user gave it
    defaults = to_dict(Config())  # for keys added after the checkpoint was written
    for key in RESUME_INVARIANTS:
        section, name = key.split(".")
        before = saved.get(section, {}).get(name, defaults[section][name])  # sections added later too
        if before != current[section][name]:
            raise CheckpointError(
                f"checkpoint {source} was written with {key}={before}, this run has "
                f"{current[section][name]}; keep it or start a new run.name"
            )
    if (saved["train"]["precision"] == "fp16") != (cfg.train.precision == "fp16"):
        raise CheckpointError(
            f"checkpoint {source} was written with train.precision={saved['train']['precision']}, this run has "
            f"{cfg.train.precision}; switching to or from fp16 loses the loss-scaler state"
        )
    # The global batch fixes the epoch's step count, the data position and the LR schedule.
    global_batch = state["global_batch"]
    if batch.global_batch == global_batch:
        return batch
    for key, before, now in (
        ("train.global_batch", saved["train"].get("global_batch"), cfg.train.global_batch),
        # The micro-batch as it ran (data.batch_size=auto records the one it found).
        ("data.batch_size", state.get("micro_batch", saved["data"]["batch_size"]), batch.micro),
        ("train.grad_accum_steps", saved["train"]["grad_accum_steps"], cfg.train.grad_accum_steps),
    ):
        if before != now:
            raise CheckpointError(
                f"checkpoint {source} was written with {key}={before}, this run has {now}, which changes the "
                f"global batch of {global_batch}; keep it or start a new run.name"
            )
    # The same settings on another world size: accumulation makes up the global batch.
    per_micro_batch = batch.world_size * batch.micro
    if global_batch % per_micro_batch:
        raise CheckpointError(
            f"checkpoint {source} was written with a global batch of {global_batch}; {batch.world_size} processes x "
            f"data.batch_size {batch.micro} cannot make it up by accumulation"
        )
    return dataclasses.replace(batch, accum=global_batch // per_micro_batch)
