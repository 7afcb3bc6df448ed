"""The training loop: gradient-accumulating AMP steps, scheduled evaluation and checkpoints.

Each step is one forward_backward and one optimizer update (step.py); what the loop logs is
interval.py's, what it saves the Checkpointer's, and every feature beyond that (sparsity, EMA,
early stopping, best checkpoints, profiler, users' callbacks) is a component hooked in at a few
fixed points. The hot path does no host sync: losses and the non-finite check stay on the
device and are read only every `train.log_every` steps and before a checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_train.distributed import DistEnv, all_reduce_max, broadcast_buffers
from dist_train.train.assembly import Run
from dist_train.train.evaluation import evaluate_run
from dist_train.train.interval import Interval
from dist_train.train.plan import Plan
from dist_train.train.step import forward_backward, optimizer_step


@dataclass
class TrainResult:
    step: int
    eval_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped_by: str | None = None  # the signal that ended the run early, after a checkpoint
    early_stop: str | None = None  # why a component (train.early_stop) ended the run, after a checkpoint


def fit(run: Run, plan: Plan) -> TrainResult:
    train, components = run.cfg.train, run.components
    result = TrainResult(step=plan.start_step)
    components.on_start(run)
    if plan.start_step >= plan.end_step or components.stop_reason():
        done = (
            components.stop_reason() or f"the run is at step {plan.start_step}, this invocation ends at {plan.end_step}"
        )
        run.logger.message(f"nothing to do: {done}")
        return result

    amp, params, interval = run.autocast(), run.trained_params, Interval(run)
    run.train_mode()
    for step in range(plan.start_step + 1, plan.end_step + 1):
        step_loss, data_wait = forward_backward(run, amp)
        stop_signal = run.stop.poll(step)  # the same answer on every rank
        log_now = step % train.log_every == 0 or step == plan.end_step or stop_signal is not None
        updated, grad_norm = optimizer_step(run, params, step_loss, log_now, skip_nonfinite=interval.skip_nonfinite)
        interval.add(step, step_loss, updated, data_wait)
        components.after_step(run, step)  # prune.sparsity's masks, EMA, users' callbacks
        run.scheduled_gc.after_step(step)  # every rank collects at the same steps
        if log_now:
            interval.log(step, grad_norm)

        scheduled_eval = bool(train.eval_every and step % train.eval_every == 0) or step == plan.last_step
        eval_due = (scheduled_eval or step == plan.end_step) and stop_signal is None
        checkpoint_due = run.checkpointer.due(step, plan.end_step, stop_signal is not None)
        with interval.paused(eval_due or checkpoint_due):
            if eval_due:
                result.eval_metrics = _evaluate(run, step)
                # Components see the run's own schedule only, not the extra evaluation at an
                # invocation's end (train.stop_at_step): decisions must not depend on where it resumed.
                if scheduled_eval:
                    components.after_eval(run, step, result.eval_metrics)
                    result.early_stop = _agreed_stop(components.stop_reason(), run.env)
            if checkpoint_due or result.early_stop is not None:
                final = step == plan.end_step or stop_signal is not None or result.early_stop is not None
                result.checkpoint = _save(run, interval, step, final)
        result.step = step
        if stop_signal is not None and step < plan.end_step:
            run.logger.message(f"stopped at step {step} on {stop_signal}, checkpoint saved; the same command continues")
            result.stopped_by = stop_signal
            break
        if result.early_stop is not None:
            run.logger.message(f"{result.early_stop}; checkpoint saved")
            break
    components.at_end(run, result.step)
    return result


def _evaluate(run: Run, step: int) -> dict[str, float]:
    """A scheduled evaluation, logged; the model goes back to training mode after it."""
    # Each rank's BatchNorm statistics drifted with its own batches: evaluate rank 0's.
    model = run.strategy.unwrap(run.model)
    broadcast_buffers(model)
    files = (run.cfg.run_dir, f"step_{step:08d}") if run.env.is_main else None  # rank 0 writes them
    with run.components.eval_weights(run):  # train.ema's average, where kept
        metrics = evaluate_run(run, model, files)
    run.log(step, metrics)
    run.train_mode()
    return metrics


def _save(run: Run, interval: Interval, step: int, final: bool) -> Path:
    interval.check_weights(step)  # never let a NaN model replace the last good checkpoint
    run.components.before_save(run, step)
    save_start = time.perf_counter()
    saved = run.checkpointer.save(step, final)
    run.log(step, {"checkpoint_stall_s": time.perf_counter() - save_start})  # what training waited
    return saved


def _agreed_stop(reason: str | None, env: DistEnv) -> str | None:
    """A component's stop, agreed by every rank (a user's callback may answer on one rank only):
    one small all-reduce per evaluation."""
    if not env.is_distributed:
        return reason
    anyone = all_reduce_max(torch.tensor(int(reason is not None), device=env.device)).item()
    return (reason or "a component on another rank asked the run to stop") if anyone else None
