"""logging.wandb: one W&B run per dist_train run, continued across resumes by its id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_train.config import Config, UserError, to_dict
from dist_train.logger.base import NoFinish


class WandB(NoFinish):
    def __init__(self, cfg: Config, run_dir: Path, run_id: str) -> None:
        import wandb

        try:
            self.run = wandb.init(
                project=cfg.logging.wandb.project,
                entity=cfg.logging.wandb.entity,
                name=cfg.run.name,
                id=run_id,
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

    def log(self, step: int, metrics: dict[str, Any], walltime: float) -> None:
        self.run.log(metrics, step=step)

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)  # a failed run shows as failed in W&B
