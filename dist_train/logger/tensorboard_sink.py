"""logging.tensorboard: every logged scalar to RUN_DIR/tensorboard/, in sections, and the
hyperparameters beside the final validation metrics when the run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_train.errors import UserError
from dist_train.logger.base import scalars

# TensorBoard groups tags into sections by the text before the first '/': metrics.jsonl keys
# (left) go to these sections; the README's Logging section lists the mapping.
THROUGHPUT_KEYS = ("samples_per_s", "tokens_per_s", "mfu", "step_time", "data_wait_fraction")
MEMORY_KEYS = ("param_optim_mb", "max_memory_gb", "max_reserved_gb", "alloc_retries")


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


class TensorBoard:
    def __init__(self, log_dir: Path, resumed_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError(
                f"logging.tensorboard=true needs the tensorboard package ({exc}); "
                "pip install tensorboard, or set logging.tensorboard=false"
            ) from None
        # purge_step starts this invocation's events with a SessionLog.START at the first step it
        # trains: TensorBoard's reader then drops every earlier-written event from that step on
        # (steps logged after the last checkpoint, before a crash), as metrics.jsonl drops its
        # lines, so the resumed stream has each step once. Flushed every 10 s to follow live.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_step + 1, flush_secs=10)

    def log(self, step: int, metrics: dict[str, Any], walltime: float) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(tensorboard_tag(key), value, step, walltime=walltime)

    def finished(self, hparams: dict[str, float | int | str], final_metrics: dict[str, float], step: int) -> None:
        """The HParams table reads a metric's value as the last point of the scalar tag it
        names, so it shows the real final values, no placeholder."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        metric_tags = {tensorboard_tag(k): v for k, v in final_metrics.items()}
        # Into this run's own event stream at its last step, not the timestamped sub-run that
        # SummaryWriter.add_hparams would start: one run directory stays one TensorBoard run.
        for summary in hparams_summaries(hparams, metric_tags):
            self.writer.file_writer.add_summary(summary, step)

    def close(self, exit_code: int) -> None:
        self.writer.close()  # flushes what is still queued
