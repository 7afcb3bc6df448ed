"""Console lines on rank 0, or a progress bar when stderr is a terminal (train.progress_bar)."""

from __future__ import annotations

import math
import sys
from typing import Any

from dist_train.logger.base import NoFinish


class Console(NoFinish):
    def __init__(self, progress_bar: bool, resumed_step: int, total_steps: int) -> None:
        self.progress = None
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=resumed_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], walltime: float) -> None:
        if self.progress is not None:
            self.progress.update(step - self.progress.n)
            self.progress.set_postfix({k: _short(v) for k, v in metrics.items() if k in ("loss", "lr", "val_acc")})
        else:
            print(f"step {step} " + " ".join(f"{k}={_short(v)}" for k, v in metrics.items()), flush=True)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def close(self, exit_code: int) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
