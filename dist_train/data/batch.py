"""The shape of one optimizer step's batch: ranks x micro-batch x accumulation, arithmetic on the
config and the world size (no torch here), which `dist-train config` shows before any training."""

from __future__ import annotations

from dataclasses import dataclass

from dist_train.config import Config, ConfigError


@dataclass(frozen=True)
class Batch:
    """How an optimizer step's samples are made up. Derived once per run (plan.py) from
    data.batch_size (or the search's micro-batch), train.grad_accum_steps / train.global_batch
    and the world size; the config itself keeps what the user wrote."""

    world_size: int
    micro: int  # samples per rank per forward (data.batch_size as it runs)
    accum: int  # micro-batches per optimizer step

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro * self.accum

    def describe(self) -> str:
        return f"global batch {self.global_batch} ({self.world_size} x {self.micro} x {self.accum} accumulation)"


def split_global_batch(cfg: Config, world: int, micro: int, searched: bool = False) -> Batch:
    """The step's batch for a micro-batch: with train.global_batch, the accumulation that makes
    it up, and for a micro-batch the search found (`searched`) the largest size up to it that can."""
    global_batch = cfg.train.global_batch
    if global_batch is None:
        return Batch(world, micro, cfg.train.grad_accum_steps)
    check_global_batch(cfg, world)
    if searched:
        micro = max(d for d in range(1, micro + 1) if (global_batch // world) % d == 0)
    if global_batch % (world * micro):
        raise ConfigError(
            f"train.global_batch={global_batch} is not a multiple of {world} processes x data.batch_size {micro}"
        )
    return Batch(world, micro, global_batch // (world * micro))


def check_global_batch(cfg: Config, world: int) -> None:
    if cfg.train.global_batch is not None and cfg.train.global_batch % world:
        raise ConfigError(f"train.global_batch={cfg.train.global_batch} is not a multiple of the {world} processes")
