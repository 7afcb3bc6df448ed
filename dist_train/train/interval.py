"""What the loop logs every train.log_every steps, and the loss bookkeeping behind it.

Step losses stay on the device and are stacked only at logging time (and before a save): per
step no tensor op beyond the loss itself, where each would cost ~5-20 us on a CPU whose caches
the step has just evicted, and no host sync. Evaluation and saving do not count as training time.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch

from dist_train.distributed import all_reduce_max, all_reduce_sum
from dist_train.efficiency import (
    device_memory,
    flops_per_token,
    full_tensor,
    local_shard,
    mfu,
    param_and_optimizer_bytes,
    peak_flops,
)
from dist_train.errors import UserError
from dist_train.train.assembly import Run


class NonFiniteLossError(UserError):
    pass


class Interval:
    """This logging interval's step losses (each the sum over its micro-batches), its steps,
    its time and its wait for data."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.device = run.env.device
        shape = run.data.spec.input_shape
        self.tokens_per_sample = shape[0] if len(shape) == 1 else 0
        self.model_flops = flops_per_token(run.strategy.unwrap(run.model)) if self.tokens_per_sample else None
        self.peak = peak_flops(self.device, run.cfg.train.peak_tflops)  # None on CPU: no MFU there
        self.skip_nonfinite, self.skipped_steps = run.cfg.train.nonfinite == "skip", 0
        self.losses: list[torch.Tensor] = []
        self.loss_steps: list[int] = []
        self._reset()

    def _reset(self) -> None:
        self.losses.clear()
        self.loss_steps.clear()
        self.start, self.data_wait, self.steps = time.perf_counter(), 0.0, 0

    def add(self, step: int, step_loss: torch.Tensor, updated: bool, data_wait: float) -> None:
        if updated:
            self.losses.append(step_loss)
            self.loss_steps.append(step)
        else:  # train.nonfinite=skip skipped it: its loss is not counted
            self.skipped_steps += 1
        self.data_wait += data_wait
        self.steps += 1

    def summed_losses(self, weights_ok: torch.Tensor | None = None, step: int = 0) -> list[float]:
        """This interval's step losses summed over ranks, in one all-reduce that also finds the
        first step whose loss (or, at `step`, whose weights) went non-finite on any rank: a
        NaN or Inf on one rank stays one in the sum. Every rank counts the same steps."""
        values = torch.stack(self.losses) if self.losses else torch.zeros(0, device=self.device)
        steps = list(self.loss_steps)
        if weights_ok is not None:
            # .to(values): with FSDP's CPU offload the shards, and so weights_ok, live on the CPU.
            values = torch.cat([values, torch.where(weights_ok, 0.0, math.nan).reshape(1).to(values)])
            steps.append(step)
        sums = all_reduce_sum(values).tolist()
        bad = next((s for s, value in zip(steps, sums, strict=True) if not math.isfinite(value)), None)
        if bad is not None:
            raise NonFiniteLossError(
                f"loss or weights became NaN/Inf at step {bad}; stopping (checkpoints written before it are kept)"
            )
        return sums[: len(self.losses)]

    def check_weights(self, step: int) -> None:
        """Before a save: a finite loss can still come with an update that made the weights
        non-finite, and a NaN model must never replace the last good checkpoint."""
        params = self.run.trained_params
        weights_ok = torch.stack([local_shard(p.detach()).isfinite().all() for p in params]).all()
        self.summed_losses(weights_ok, step)

    def log(self, step: int, grad_norm: torch.Tensor | None) -> None:
        run, device = self.run, self.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the interval's time includes its queued kernels
        step_sums = self.summed_losses()  # NaN mean when nonfinite=skip skipped the whole interval
        per_step = run.env.world_size * run.data.batch.accum
        elapsed = time.perf_counter() - self.start
        values = {
            "loss": sum(step_sums) / (per_step * len(step_sums) or math.nan),
            "lr": run.scheduler.get_last_lr()[0],
            "grad_norm": full_tensor(grad_norm).item(),
            "epoch": run.data.train.epoch,
            **({"skipped_steps": self.skipped_steps} if self.skip_nonfinite else {}),
            **({"bad_samples": run.data.train.bad_samples()} if run.cfg.data.skip_bad_samples else {}),
            **self._speed(elapsed),
            **self._memory(),
            "step_time": elapsed / self.steps,
            "data_wait_fraction": self.data_wait / elapsed,
        }
        run.log(step, values)
        self._reset()

    def _speed(self, elapsed: float) -> dict[str, float]:
        speed = {"samples_per_s": self.run.data.batch.global_batch * self.steps / elapsed}
        if self.tokens_per_sample:
            speed["tokens_per_s"] = speed["samples_per_s"] * self.tokens_per_sample
            if self.model_flops and self.peak:
                speed["mfu"] = mfu(speed["tokens_per_s"] / self.run.env.world_size, self.model_flops, self.peak)
        return speed

    def _memory(self) -> dict[str, float]:
        run, device = self.run, self.device
        memory = {"param_optim_mb": param_and_optimizer_bytes(run.model, run.optimizer) / 2**20}  # this rank's
        if device.type == "cuda":  # the fullest rank's peaks over this interval, its retries
            allocator = device_memory(torch.cuda.memory_stats(device))
            fullest = all_reduce_max(torch.tensor(list(allocator.values()), device=device)).tolist()
            memory.update(zip(allocator, fullest, strict=True))
            torch.cuda.reset_peak_memory_stats(device)
        return memory

    @contextlib.contextmanager
    def paused(self, pausing: bool) -> Iterator[None]:
        """Around evaluation and saving: their time is not training time."""
        if pausing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's queued kernels are training time, not pause
        pause_start = time.perf_counter()
        yield
        self.start += time.perf_counter() - pause_start
