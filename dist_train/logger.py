"""Rank-0 logging: console lines (or a progress bar on a terminal), metrics.jsonl, Weights & Biases.

Only rank 0 builds a RunLogger that writes anything, so a multi-process job produces exactly
one W&B run and one metrics file. `wandb` is imported only when W&B logging is switched on.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from dist_train.config import Config, UserError, to_dict


def new_wandb_run_id() -> str:
    # W&B ids are [a-z0-9]; 12 hex characters are unique enough and need no wandb import.
    return uuid.uuid4().hex[:12]


class RunLogger:
    def __init__(
        self, cfg: Config, run_dir: Path, enabled: bool, wandb_run_id: str, resumed_step: int, total_steps: int
    ) -> None:
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.progress = None
        if not enabled:
            return
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

    def close(self, exit_code: int = 0) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)  # a failed run shows as failed in W&B
            self.wandb_run = None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


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
