"""The shape of one optimizer step's batch: ranks x micro-batch x accumulation."""

from __future__ import annotations

from dataclasses import dataclass


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
