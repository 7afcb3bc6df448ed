"""Your own components: a callback that watches the run and can end it, resumable like the run,
and an experiment tracker of your own.

    python examples/callbacks.py [key=value ...]                               # through dist_train.fit
    dist-train train configs/digits.yaml \\
        'callbacks=[{target: "examples.callbacks:StopAtAccuracy", accuracy: 0.9}]'  # or from the config

A callback implements any of the hooks it needs (on_start, after_step, after_eval, on_log,
before_save, at_end, stop_reason) and, for state that must survive a restart,
state_dict/load_state_dict: that goes into every checkpoint, so a resumed run continues the
callback where it was. Each hook gets the Run: its model, optimizer, scheduler, config
(run.cfg), ranks (run.env) and run.log, which writes a record to metrics.jsonl, W&B,
TensorBoard and MLflow on rank 0 and hands it to every component's on_log.
An exception in a hook ends the run with one line naming the callback, then its frames.
"""

from __future__ import annotations

import csv
import sys

import torch


class StopAtAccuracy:
    """Ends the run at the first evaluation whose val_acc reaches `accuracy`, and logs the
    weights' global norm every `log_every` steps with the largest norm seen so far."""

    def __init__(self, accuracy: float = 0.95, log_every: int = 10) -> None:
        self.accuracy, self.log_every = accuracy, log_every
        self.reached_at: int | None = None
        self.max_weight_norm = 0.0  # over the whole run, resumes included: checkpointed

    def after_step(self, run, step: int) -> None:
        if step % self.log_every:
            return  # the norm costs a host sync: at logging intervals only
        # Under FSDP the parameters are DTensors: full_tensor() gathers, on every rank alike.
        norms = [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in run.model.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(n) for n in norms])).item()
        self.max_weight_norm = max(self.max_weight_norm, norm)
        run.log(step, {"weight_norm": norm, "max_weight_norm": self.max_weight_norm})

    def after_eval(self, run, step: int, metrics: dict[str, float]) -> None:
        # Metrics are all-reduced: every rank decides alike.
        if self.reached_at is None and metrics.get("val_acc", 0.0) >= self.accuracy:
            self.reached_at = step

    def stop_reason(self) -> str | None:
        if self.reached_at is None:
            return None
        return f"val_acc reached {self.accuracy:g} at step {self.reached_at}"

    def state_dict(self) -> dict:
        return {"reached_at": self.reached_at, "max_weight_norm": self.max_weight_norm}

    def load_state_dict(self, state: dict) -> None:
        self.reached_at, self.max_weight_norm = state["reached_at"], state["max_weight_norm"]


class CsvTracker:
    """An experiment tracker of your own: every record the run logs (losses, evaluations, the
    other callback's norms) as step,name,value rows of RUN_DIR/tracked.csv. on_log is called on
    every rank with the same record; rank 0 writes."""

    def on_log(self, run, step: int, metrics: dict[str, float]) -> None:
        if not run.env.is_main:
            return
        path = run.cfg.run_dir / "tracked.csv"
        header = [] if path.exists() else [["step", "name", "value"]]
        with open(path, "a", newline="") as f:
            csv.writer(f).writerows(header + [[step, name, value] for name, value in metrics.items()])


def main() -> None:
    import dist_train

    result = dist_train.fit(
        "configs/digits.yaml",
        ["run.name=callbacks", "logging.wandb.mode=disabled", "train.eval_every=20", *sys.argv[1:]],
        callbacks=[StopAtAccuracy(accuracy=0.9), CsvTracker()],
    )
    print(f"step {result.step}: {result.early_stop or 'trained to the end'}; {result.eval_metrics}")


if __name__ == "__main__":
    main()
