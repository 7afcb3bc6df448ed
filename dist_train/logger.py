"""Rank-0 logging: console lines (or a progress bar on a terminal), metrics.jsonl, Weights & Biases,
TensorBoard.

Only rank 0 builds a RunLogger that writes anything, so a multi-process job produces exactly
one W&B run, one metrics file and one TensorBoard event stream. `wandb` and `tensorboard` are
imported only when their logging is switched on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_train.config import Config, UserError, to_dict

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

# TensorBoard groups tags into sections by the text before the first '/': metrics.jsonl keys
# (left) go to these sections; the README's Logging section lists the mapping.
THROUGHPUT_KEYS = ("samples_per_s", "tokens_per_s", "mfu", "step_time", "data_wait_fraction")
MEMORY_KEYS = ("param_optim_mb", "max_memory_gb", "max_reserved_gb", "alloc_retries")
# Config keys that say where and how a run is recorded, not what it learns: not hyperparameters.
NOT_HYPERPARAMETERS = ("run.output_dir", "train.progress_bar", "train.stop_at_step", "checkpoint.", "logging.")


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key: training and validation loss side by side in
    loss/, validation metrics in val/, and what is not about learning in its own section."""
    named = {"lr": "lr", "loss": "loss/train", "val_loss": "loss/val"}
    if key in named:
        return named[key]
    if key.startswith("val_"):
        return "val/" + key.removeprefix("val_")
    if key in THROUGHPUT_KEYS:
        return "throughput/" + key
    if key in MEMORY_KEYS:
        return "memory/" + key
    return "train/" + key  # grad_norm, epoch, skipped_steps, bad_samples, checkpoint_stall_s


def hyperparameters(cfg: Config) -> dict[str, float | int | str]:
    """The config's scalar settings as flat dotted keys, for TensorBoard's HParams table."""
    flat: dict[str, float | int | str] = {}

    def walk(section: Any, prefix: str) -> None:
        for item in dataclasses.fields(section):
            key, value = prefix + item.name, getattr(section, item.name)
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif key.startswith(NOT_HYPERPARAMETERS) or value is None or isinstance(value, (dict, list)):
                continue  # lists and mappings are not HParams values; None is "not set"
            elif isinstance(value, bool):  # else a number 0/1: bool is an int to the HParams writer
                flat[key] = "true" if value else "false"
            else:
                flat[key] = value

    walk(cfg, "")
    return flat


def new_wandb_run_id() -> str:
    # W&B ids are [a-z0-9]; 12 hex characters are unique enough and need no wandb import.
    return uuid.uuid4().hex[:12]


class RunLogger:
    def __init__(
        self, cfg: Config, run_dir: Path, enabled: bool, wandb_run_id: str, resumed_step: int, total_steps: int
    ) -> None:
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.cfg = cfg
        self.wandb_run = None
        self.tensorboard: SummaryWriter | None = None
        self.progress = None
        self.last_step = resumed_step
        self.last_validation: dict[str, float] = {}  # this invocation's latest val_* values
        if not enabled:
            return
        if cfg.logging.tensorboard:  # first: a missing package must leave metrics.jsonl as it was
            self.tensorboard = _summary_writer(run_dir / "tensorboard", resumed_step)
        # Steps past the resume point (or everything, on a fresh start) will be trained again.
        _drop_lines_after(self.metrics_path, resumed_step)
        if cfg.logging.wandb.mode != "disabled":
            import wandb

            try:
                self.wandb_run = wandb.init(
                    project=cfg.logging.wandb.project,
                    entity=cfg.logging.wandb.entity,
                    name=cfg.run.name,
                    id=wandb_run_id,
                    resume="allow",
                    dir=str(run_dir),
                    mode=cfg.logging.wandb.mode,
                    config=to_dict(cfg),
                    tags=cfg.logging.wandb.tags,
                )
            except Exception as exc:  # e.g. online mode without `wandb login`
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(
                    f"W&B could not start a run (logging.wandb.mode={cfg.logging.wandb.mode}): {first_line}; "
                    "use logging.wandb.mode=offline to log without an account"
                ) from None
        if cfg.train.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=resumed_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics, "time": round(time.time(), 3)}  # wall clock: plots, benchmarks
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.last_step = step
        self.last_validation.update({k: v for k, v in metrics.items() if k.startswith("val_")})
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(tensorboard_tag(key), value, step, walltime=record["time"])
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.progress is not None:
            self.progress.update(step - self.progress.n)
            self.progress.set_postfix({k: _short(v) for k, v in metrics.items() if k in ("loss", "lr", "val_acc")})
        else:
            print(f"step {step} " + " ".join(f"{k}={_short(v)}" for k, v in metrics.items()), flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def finished(self, extra_hparams: dict[str, float | int | str]) -> None:
        """The run trained its last step: its hyperparameters go to TensorBoard beside the final
        validation metrics. The HParams table reads a metric's value as the last point of the
        scalar tag it names, so it shows the real final values, no placeholder."""
        if self.tensorboard is None or not self.last_validation:
            return
        from torch.utils.tensorboard.summary import hparams

        metric_tags = {tensorboard_tag(k): v for k, v in self.last_validation.items()}
        summaries = hparams({**hyperparameters(self.cfg), **extra_hparams}, metric_tags)
        # Into this run's own event stream at its last step, not the timestamped sub-run that
        # SummaryWriter.add_hparams would start: one run directory stays one TensorBoard run.
        for summary in summaries:
            self.tensorboard.file_writer.add_summary(summary, self.last_step)

    def close(self, exit_code: int = 0) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tensorboard is not None:
            self.tensorboard.close()  # flushes what is still queued
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)  # a failed run shows as failed in W&B
            self.wandb_run = None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _summary_writer(log_dir: Path, resumed_step: int) -> SummaryWriter:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UserError(
            f"logging.tensorboard=true needs the tensorboard package ({exc}); "
            "pip install tensorboard, or set logging.tensorboard=false"
        ) from None
    # purge_step starts this invocation's events with a SessionLog.START at the first step it
    # trains: TensorBoard's reader then drops every earlier-written event from that step on (steps
    # logged after the last checkpoint, before a crash), as _drop_lines_after does for
    # metrics.jsonl, so the resumed stream has each step once. Flushed every 10 s to follow live.
    return SummaryWriter(log_dir=str(log_dir), purge_step=resumed_step + 1, flush_secs=10)


def _drop_lines_after(path: Path, step: int) -> None:
    """On resume, forget metrics of steps that will be trained again, so each step appears once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash mid-write
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
