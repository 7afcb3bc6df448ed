"""`dist-train find-lr`: Leslie Smith's LR range test on the run's real global batch.

The model, data, strategy, accumulation and precision are those the config trains with (the
same forward_backward and update); only the learning rate differs: it rises exponentially from
--min-lr to --max-lr over --steps optimizer steps, every parameter group keeping its
optim.lr_multipliers ratio, and the config's warm-up and schedule are not applied.

Each step's loss is all-reduced (a host sync per step, fine for a test of a few hundred steps)
and smoothed with a bias-corrected exponential moving average. The test stops early once the
smoothed loss exceeds 4x the best so far (or is not finite). Every rank computes that from the
same all-reduced number, so all stop at the same step and none is left in a collective: ranks
that stop at different batches deadlock (fastai #2485; Lightning's tuner was documented as not
supporting DDP, #8983).

The suggestion is where the smoothed loss falls fastest against log(lr), each smoothed value
placed at the lrs it averages (Smoother); the lowest point's lr / 10 is reported beside it.
Rank 0 writes lr_find.csv and lr_find.png; nothing else is written: no checkpoint, no run
directory, no metrics or W&B.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_train.config import Config, ConfigError, UserError
from dist_train.data import Batch
from dist_train.distributed import DistEnv, all_gather_objects, all_reduce_sum, broadcast_object, process_group
from dist_train.train.assembly import assemble, device_strategy
from dist_train.train.batch_search import resolve_batch
from dist_train.train.step import forward_backward, optimizer_step
from dist_train.worker_env import FLIGHT_RECORDER_DIR

DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times the best
FILES = ("lr_find.csv", "lr_find.png")


def smoothing(steps: int) -> float:
    """The moving average's weight of the past: it spans a tenth of the test, at most fastai's 50
    steps (0.98). fastai's 0.98 over a 100-step test would average half the test, 4 decades of lr."""
    return 1 - 1 / max(1.0, min(50.0, steps / 10))


@dataclass
class Smoother:
    """A bias-corrected exponential moving average of the loss, and the same average of log(lr):
    the lr the smoothed loss belongs to. It averages the losses of the last steps, taken at lower
    lrs, so placing it at the newest lr would shift the curve right by the average's lag (the
    familiar lag of fastai's plots) and the steepest descent with it, toward divergence. At the
    mean of its lrs a loss that changes steadily in log(lr) is where it was; a sharp drop is
    blurred one way only and reads a little low (tests/test_tuning.py: 0.01 reads as 0.007)."""

    beta: float
    loss: float = 0.0
    log_lr: float = 0.0
    steps: int = 0

    def add(self, lr: float, loss: float) -> tuple[float, float]:
        """(smoothed loss, its lr) after this step."""
        self.steps += 1
        self.loss = self.beta * self.loss + (1 - self.beta) * loss
        self.log_lr = self.beta * self.log_lr + (1 - self.beta) * math.log(lr)
        correction = 1 - self.beta**self.steps  # no pull toward the average's start at 0
        return self.loss / correction, math.exp(self.log_lr / correction)


@dataclass(frozen=True)
class RangeOptions:
    min_lr: float = 1e-7
    max_lr: float = 10.0
    steps: int = 100

    def check(self) -> None:
        if not 0 < self.min_lr < self.max_lr or not math.isfinite(self.max_lr):
            raise ConfigError(f"--min-lr {self.min_lr:g} and --max-lr {self.max_lr:g} must satisfy 0 < min < max")
        if self.steps < 2:
            raise ConfigError(f"--steps must be >= 2, got {self.steps}")

    def lr(self, step: int) -> float:
        """The lr of optimizer step `step` (from 0): exponential from min_lr to max_lr."""
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / (self.steps - 1))


@dataclass
class RangeTest:
    lrs: list[float]  # each step's lr (the base parameter groups')
    losses: list[float]  # each step's loss, the mean over the global batch
    smoothed: list[float]
    smoothed_lrs: list[float]  # where each smoothed loss belongs (see Smoother)
    steps: int  # asked for; fewer ran when the loss diverged
    diverged: bool = False

    def _window(self) -> tuple[int, int] | None:
        """(first, lowest): the part of the smoothed curve a suggestion reads. The first tenth is
        left out (the average still moves with each new loss there), and so is everything past
        the lowest point (only the climb toward divergence). None if nothing is left."""
        y = np.array(self.smoothed, dtype=float)
        first = len(y) // 10
        if not np.isfinite(y[first:]).any():
            return None
        return first, first + int(np.nanargmin(y[first:]))

    def steepest(self) -> int | None:
        """The step where the smoothed loss falls fastest against log(lr), between the window's
        ends; None when there is no descent to measure."""
        window = self._window()
        if window is None or window[1] - window[0] < 2:
            return None
        first, lowest = window
        slope = np.gradient(np.array(self.smoothed[first : lowest + 1]), np.log(self.smoothed_lrs[first : lowest + 1]))
        return first + int(np.argmin(slope))

    def lowest(self) -> int | None:
        window = self._window()
        return None if window is None else window[1]

    def fell(self) -> float:
        """How much of its level the smoothed loss lost between the window's ends (0.1: 10%)."""
        window = self._window()
        return 0.0 if window is None else 1 - self.smoothed[window[1]] / self.smoothed[window[0]]

    def suggestion(self) -> float | None:
        steepest, lowest = self.steepest(), self.lowest()
        if steepest is not None:
            return self.smoothed_lrs[steepest]
        return None if lowest is None else self.smoothed_lrs[lowest] / 10


def range_test(cfg: Config, env: DistEnv, options: RangeOptions) -> RangeTest:
    """The range test on every rank of the process group; each rank returns the same curve."""
    strategy = device_strategy(cfg, env)
    batch = resolve_batch(cfg, env, strategy)  # data.batch_size=auto and train.global_batch, as training
    run = assemble(cfg, env, strategy, batch, lr_factor=lambda step: options.lr(step) / cfg.optim.lr)
    if env.is_main:
        print(_heading(cfg, batch, options), flush=True)

    test = RangeTest([], [], [], [], options.steps)
    smoother, best, samples = Smoother(smoothing(options.steps)), math.inf, batch.world_size * batch.accum
    run.train_mode()
    for _ in range(options.steps):
        lr = run.optimizer.param_groups[0]["lr"]  # the base groups': optim.lr's place
        step_loss, _ = forward_backward(run, run.autocast())
        optimizer_step(run, run.trained_params, step_loss, measure_norm=False, skip_nonfinite=False)
        # The same number on every rank: the early stop below is decided alike everywhere.
        loss = all_reduce_sum(step_loss.detach().double().reshape(1)).item() / samples
        smoothed, smoothed_lr = smoother.add(lr, loss)
        test.lrs.append(lr)
        test.losses.append(loss)
        test.smoothed.append(smoothed)
        test.smoothed_lrs.append(smoothed_lr)
        best = min(best, smoothed)
        if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
            test.diverged = True
            break
    stopped = all_gather_objects(len(test.lrs))
    if len(set(stopped)) > 1:  # cannot happen while the decision is taken from the all-reduced loss
        raise RuntimeError(f"find-lr: the ranks stopped at different steps: {stopped}")
    if env.is_main:
        steps = f"{len(test.lrs)} of {options.steps} steps"
        if test.diverged:
            print(
                f"stopped early at step {len(test.lrs)} on all {env.world_size} ranks (steps per rank: {stopped}): "
                f"smoothed loss {test.smoothed[-1]:.4g} > {DIVERGED:g} x the best {best:.4g}",
                flush=True,
            )
        else:
            print(f"ran all {steps} on {env.world_size} ranks", flush=True)
    return test


def _heading(cfg: Config, batch: Batch, options: RangeOptions) -> str:
    warmup = f", schedule.warmup_steps={cfg.schedule.warmup_steps}" if cfg.schedule.warmup_steps else ""
    return (
        f"find-lr: {options.steps} steps, lr {options.min_lr:g} -> {options.max_lr:g} (exponential), "
        f"{batch.describe()}, {cfg.model.name}, {cfg.optim.name}, {cfg.parallel.strategy}, {cfg.train.precision}\n"
        f"not applied during the test: schedule.name={cfg.schedule.name}{warmup} (the LR is the test's)"
    )


def default_out(cfg: Config) -> Path:
    """A new folder beside the run directory: RUN_DIR-lr_find."""
    return Path(str(cfg.run_dir) + "-lr_find")


def out_problem(out: Path) -> str | None:
    """Why --out cannot take the results, or None. The launcher may have made the NCCL flight
    recorder's folder in it (launch_config below): that alone does not make it taken."""
    if not out.exists():
        return None
    if not out.is_dir():
        return f"--out {out} is a file; give a new folder"
    if any(entry.name != FLIGHT_RECORDER_DIR for entry in out.iterdir()):
        return f"--out {out} already exists and is not empty; give a new folder (nothing there is overwritten)"
    return None


def launch_config(cfg: Config, out: Path) -> Config:
    """The config `dist-train launch` prepares the node with: its run directory is --out, so the
    NCCL flight recorder would dump there, not into the run's directory."""
    run = dataclasses.replace(cfg.run, output_dir=str(out.parent), name=out.name)
    return dataclasses.replace(cfg, run=run)


def find_lr(cfg: Config, options: RangeOptions, out: Path) -> RangeTest:
    """`dist-train find-lr`: the range test on every rank; rank 0 writes and prints the results."""
    options.check()
    with process_group(cfg.parallel.collective_timeout_s, cfg.parallel.backend) as env:
        problem = broadcast_object(out_problem(out) if env.is_main else None)  # every rank stops alike
        if problem:
            raise UserError(problem)
        test = range_test(cfg, env, options)
        if env.is_main:
            write(test, out, cfg)
            print("\n".join(report(test, out)), flush=True)
        return test


def write(test: RangeTest, out: Path, cfg: Config) -> None:
    """lr_find.csv and lr_find.png into `out`, made now."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / FILES[0], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed", "smoothed_lr"])
        rows = zip(test.lrs, test.losses, test.smoothed, test.smoothed_lrs, strict=True)
        for step, row in enumerate(rows, start=1):
            writer.writerow([step, *(f"{v:.6g}" for v in row)])
    plot(test, out / FILES[1], f"{cfg.run.name}: {cfg.model.name}, {cfg.optim.name}")


def plot(test: RangeTest, path: Path, title: str) -> None:
    # The Agg canvas directly: no pyplot, no display, no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    losses = np.array(test.losses)  # a diverged last step's NaN or Inf is left out of the line
    ax.plot(test.lrs, np.where(np.isfinite(losses), losses, np.nan), color="0.75", linewidth=1, label="loss")
    ax.plot(test.smoothed_lrs, test.smoothed, color="C0", label="smoothed (at the lrs it averages)")
    steepest, lowest = test.steepest(), test.lowest()
    if steepest is not None:
        at = test.smoothed_lrs[steepest]
        ax.plot([at], [test.smoothed[steepest]], "o", color="C3", label=f"steepest descent: {at:.2g}")
    if lowest is not None:
        tenth = test.smoothed_lrs[lowest] / 10
        ax.axvline(tenth, color="C2", linestyle="--", linewidth=1, label=f"min-loss lr / 10: {tenth:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    finite = [v for v in test.smoothed if math.isfinite(v)]
    if finite:  # the diverging tail would flatten the part that matters
        ax.set_ylim(min(finite) * 0.95, min(max(finite), DIVERGED * min(finite)) * 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def report(test: RangeTest, out: Path) -> list[str]:
    """The printed summary: a short table of the curve, the suggestions and the override."""
    n = len(test.lrs)
    shown = sorted({*range(0, n, max(1, math.ceil(n / 10))), n - 1})
    lines = ["   step         lr      loss  smoothed  smoothed_lr (the lr the smoothed loss averages around)"]
    lines += [
        f"{i + 1:>7} {test.lrs[i]:>10.3g} {test.losses[i]:>9.4g} {test.smoothed[i]:>9.4g} {test.smoothed_lrs[i]:>12.3g}"
        for i in shown
    ]
    steepest, lowest, suggestion = test.steepest(), test.lowest(), test.suggestion()
    if steepest is not None:
        lines.append(f"steepest descent of the smoothed loss: lr {test.smoothed_lrs[steepest]:.2g}")
    else:
        lines.append("no descent before the lowest point to measure a slope on: suggesting the min-loss lr / 10")
    if lowest is not None:
        at = test.smoothed_lrs[lowest]
        lines.append(f"lowest smoothed loss {test.smoothed[lowest]:.4g} at lr {at:.2g}; / 10 = {at / 10:.2g}")
    if test.fell() < 0.05:
        lines.append(
            f"note: the smoothed loss fell by {100 * test.fell():.1f}% only: the model may not have started to learn "
            "in this test (more --steps, or a narrower --min-lr/--max-lr, give it more steps at each lr)"
        )
    lines.append(f"wrote {out / FILES[0]} and {out / FILES[1]}")
    if suggestion is None:
        lines.append("no suggestion: the loss was never finite")
    else:
        lines.append(f"use: optim.lr={float(f'{suggestion:.2g}')!r}")
    return lines
