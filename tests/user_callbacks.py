"""Users' callbacks for tests/test_components.py, named in configs as tests/user_callbacks.py's
classes (`user_callbacks:Class`, with tests/ on the path)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class HookLog:
    """Appends every hook it sees to `path` (one JSON line each, rank 0 only) and counts steps
    in its checkpointed state, so a resumed run shows whether that count came back."""

    def __init__(self, path: str, every: int = 1) -> None:
        self.path, self.every, self.steps_seen = Path(path), every, 0

    def _write(self, run, **record) -> None:
        if run.env.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_start(self, run) -> None:
        self._write(run, hook="on_start", steps_seen=self.steps_seen)

    def after_step(self, run, step: int) -> None:
        self.steps_seen += 1
        if step % self.every == 0:
            run.logger.log(step, {"callback_steps_seen": self.steps_seen})

    def after_eval(self, run, step: int, metrics: dict) -> None:
        self._write(run, hook="after_eval", step=step, val_loss=metrics["val_loss"])

    def before_save(self, run, step: int) -> None:
        self._write(run, hook="before_save", step=step)

    def at_end(self, run, step: int) -> None:
        self._write(run, hook="at_end", step=step, steps_seen=self.steps_seen)

    def state_dict(self) -> dict:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict) -> None:
        self.steps_seen = state["steps_seen"]


class FailsAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, run, step: int) -> None:
        if step == self.step:
            _users_helper(step)


def _users_helper(step: int) -> None:
    raise ValueError(f"the user's bug at step {step}")


class StopsOnOneRank:
    """Asks the run to stop from one rank only, after its first evaluation."""

    def __init__(self, rank: int) -> None:
        self.rank, self.asked = rank, False

    def after_eval(self, run, step: int, metrics: dict) -> None:
        self.asked = int(os.environ.get("RANK", "0")) == self.rank

    def stop_reason(self) -> str | None:
        return f"rank {self.rank} asked to stop" if self.asked else None
