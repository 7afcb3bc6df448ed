"""The training loop: setup, gradient-accumulating AMP steps, evaluation, checkpoints.

Read it top to bottom: `train` builds a Run (run.py: what a run is made of) and restores a checkpoint,
`_fit` is the loop. The Task owns the loss and the validation metrics, so the loop never
branches on what is learned. The hot path does no host sync; losses and the non-finite check
stay on the device and are read only every `train.log_every` steps and before a checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dist_train import checkpoint
from dist_train.checkpointer import Checkpointer, SchedulePosition
from dist_train.components import build_components
from dist_train.config import Config, UserError, check_device, dump_yaml, resolve_auto, to_dict
from dist_train.data import build_pipeline
from dist_train.data.loader import load_datasets
from dist_train.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
    is_timeout,
    on_rank0,
    process_group,
    unresponsive_ranks,
)
from dist_train.efficiency import (
    device_memory,
    flops_per_token,
    full_tensor,
    local_shard,
    mfu,
    param_and_optimizer_bytes,
    peak_flops,
)
from dist_train.logger import RunLogger, new_wandb_run_id
from dist_train.optim import build_scheduler
from dist_train.parallel import build_strategy
from dist_train.plan import Plan, make_plan
from dist_train.preemption import STOPPED_MARKER, StopRequest
from dist_train.process_settings import (
    ScheduledGC,
    deterministic_algorithms,
    retain_freed_host_memory,
    seed_everything,
    set_cuda_math,
)
from dist_train.run import Run, UserParts, build_trainable, forward_backward, optimizer_step
from dist_train.tasks import Task, build_task


class NonFiniteLossError(UserError):
    pass


@dataclass
class TrainResult:
    step: int
    eval_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped_by: str | None = None  # the signal that ended the run early, after a checkpoint
    early_stop: str | None = None  # why a component (train.early_stop) ended the run, after a checkpoint


def train(cfg: Config, parts: UserParts | None = None) -> TrainResult:
    """Train (or resume) the run `cfg` describes, in this process: one rank of torchrun's
    group when started under it, else alone. dist_train.fit is the public entry point."""
    if resolve_auto(cfg.train.retain_host_memory, when_auto=not torch.cuda.is_available()):
        retain_freed_host_memory()
    with (
        deterministic_algorithms(cfg.train.deterministic),
        process_group(cfg.parallel.collective_timeout_s, cfg.parallel.backend) as env,
    ):
        return _train(cfg, env, parts or UserParts())


def _train(cfg: Config, env: DistEnv, parts: UserParts) -> TrainResult:
    check_device(cfg, env.device.type == "cuda")
    strategy = build_strategy(cfg.parallel, env, cfg.train.precision)
    if env.device.type == "cuda":
        set_cuda_math(cfg.train)
    run_dir, checkpoint_root = cfg.run_dir, cfg.run_dir / "checkpoints"
    datasets = parts.datasets if parts.datasets is not None else load_datasets(cfg.data, env)
    plan = make_plan(cfg, env, strategy, datasets, parts)
    resume, start_step, last_step = plan.resume, plan.start_step, plan.last_step

    seed_everything(cfg.run.seed)  # the same on every rank: identical initial weights
    data = build_pipeline(cfg.data, env, plan.batch, cfg.run.seed, datasets)
    trainable = build_trainable(cfg, env, strategy, data, parts.model, resuming=resume is not None)
    model, optimizer = trainable.model, trainable.optimizer
    fused, channels_last = trainable.fused, trainable.channels_last
    task = build_task(cfg.train, parts.loss)
    scheduler = build_scheduler(cfg.schedule, optimizer, last_step)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
    seed_everything(cfg.run.seed + env.rank)  # per-rank randomness (dropout) from here on

    # Built before a resume restores their state; prune.sparsity's masks wait for on_start.
    components = build_components(cfg, strategy.unwrap(model), env.rank, start_step, last_step, parts.callbacks)
    wandb_run_id = broadcast_object(new_wandb_run_id() if resume is None else resume.state["wandb_run_id"])
    # A checkpoint holds model and optimizer (DCP), these parts' states under their names (saved
    # and restored from this one declaration), and what it records about the run.
    checkpointer = Checkpointer(
        cfg.checkpoint, checkpoint_root, env, model, optimizer,
        stateful={
            "scheduler": SchedulePosition(scheduler), "scaler": scaler, "data": data.train, "components": components,
        },
        record={
            "wandb_run_id": wandb_run_id,
            "config": to_dict(cfg),  # as the user wrote it
            "plan": plan.of_the_run(),
            # The batch as it ran, read by resume checks (data.batch_size=auto resumes with it).
            "world_size": env.world_size, "global_batch": plan.batch.global_batch, "micro_batch": plan.batch.micro,
        },
        tensors=components.tensors,
    )  # fmt: skip
    if resume is not None:
        checkpointer.restore(resume.path, resume.state, fused, not plan.world_changed, cfg.run.seed)

    def open_run_dir() -> RunLogger:
        _make_dir(run_dir)  # only now: a failed start leaves nothing behind
        (run_dir / STOPPED_MARKER).unlink(missing_ok=True)  # from an earlier early stop
        # After a rewind to an older checkpoint, newer ones belong to the abandoned future:
        # moved aside (not deleted), so `resume: auto` and pruning never mistake them for ours.
        for path in checkpoint.set_aside_newer(checkpoint_root, start_step):
            print(f"set aside {path.name} (newer than the step {start_step} this run resumes from)", flush=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))  # as the user wrote it
        (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1) + "\n")  # as it runs here
        return RunLogger(cfg, run_dir, True, wandb_run_id, start_step, last_step)

    logger = on_rank0(env, open_run_dir, share=False) or RunLogger(cfg, run_dir, False, wandb_run_id, 0, 0)
    failed = True
    try:
        for line in plan.describe():
            logger.message(line)
        for line in trainable.notes + components.notes:
            logger.message(line)
        settings = [strategy.name, cfg.train.precision]
        settings += ["channels_last"] if channels_last else []
        settings += ["fused optimizer"] if fused else []
        settings += [f"process group {dist.get_backend()}"] if dist.is_initialized() else []
        settings += [f"loss {task.name}"]
        logger.message(f"training {last_step} steps of {plan.batch.describe()} on {env.device}, {', '.join(settings)}")
        mesh = strategy.describe_mesh()
        if mesh:
            logger.message(mesh)
        if data.baseline_val_loss is not None:
            logger.message(f"baseline: val_loss={data.baseline_val_loss:.4g} predicting from token frequencies alone")

        checkpointer.start(cfg.parallel.collective_timeout_s, logger.message)  # checkpoint.async_save's writer

        stop = StopRequest([cfg.checkpoint.preempt_signal, "SIGTERM"], cfg.parallel.collective_timeout_s)
        with stop, ScheduledGC(cfg.train.gc_every_steps) as gc:
            run = Run(
                cfg, env, model, strategy, optimizer, scheduler, scaler, data, task, logger, checkpointer, stop,
                channels_last=channels_last, components=components, scheduled_gc=gc,
            )  # fmt: skip
            try:
                result = _fit(run, plan)
            except (RuntimeError, dist.DistError) as exc:
                if not (env.is_distributed and is_timeout(exc)):
                    raise
                raise _timeout_error(exc, cfg.parallel.collective_timeout_s, stop.group) from None
        if result.step == last_step > start_step or result.early_stop:  # the run is done
            batch = plan.batch  # as it ran: data.batch_size=auto and train.global_batch resolved
            shape = {"world_size": batch.world_size, "micro_batch": batch.micro, "grad_accum_steps": batch.accum}
            logger.finished({**shape, "global_batch": batch.global_batch})
        if result.stopped_by and env.is_main:
            marker = {"step": result.step, "signal": result.stopped_by, "checkpoint": str(result.checkpoint)}
            (run_dir / STOPPED_MARKER).write_text(json.dumps(marker) + "\n")
        failed = False
        return result
    finally:
        checkpointer.close()  # after a failure: no write left running while the process group goes
        logger.close(exit_code=1 if failed else 0)


class CollectiveTimeoutError(UserError):
    pass


def _timeout_error(exc: BaseException, timeout_s: float, healthy_group) -> CollectiveTimeoutError:
    first = next((line.strip() for line in str(exc).splitlines() if is_timeout(line)), str(exc)[:200])
    backend_says = re.sub(r"^\[[^\]]*\]\s*", "", first)  # drop gloo's "[source/file.cc:78]" prefix
    silent = unresponsive_ranks(healthy_group, min(timeout_s, 30.0))
    who = f"rank(s) {', '.join(map(str, silent))} did not respond" if silent else "another rank stopped participating"
    return CollectiveTimeoutError(
        f"a collective timed out after {timeout_s:g} s ({backend_says}); {who}: hung, dead or far slower. "
        "parallel.collective_timeout_s sets the limit"
    )


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run directory {path} (run.output_dir/run.name): {exc.strerror}") from None


def _fit(run: Run, plan: Plan) -> TrainResult:
    cfg, env, model, data, task = run.cfg, run.env, run.model, run.data, run.task
    strategy, optimizer, scheduler, logger = run.strategy, run.optimizer, run.scheduler, run.logger
    t = cfg.train
    amp, device = run.autocast(), env.device
    params = [p for p in model.parameters() if p.requires_grad]
    start_step, end_step = plan.start_step, plan.end_step
    result = TrainResult(step=start_step)
    run.components.on_start(run)
    if start_step >= end_step or run.components.stop_reason():
        done = run.components.stop_reason() or f"the run is at step {start_step}, this invocation ends at {end_step}"
        logger.message(f"nothing to do: {done}")
        return result

    tokens_per_sample = data.spec.input_shape[0] if len(data.spec.input_shape) == 1 else 0
    model_flops = flops_per_token(strategy.unwrap(model)) if tokens_per_sample else None
    peak = peak_flops(device, t.peak_tflops)  # None on CPU: MFU is not reported there
    # This logging interval's step losses (each the sum over its micro-batches), left on the
    # device and stacked only at logging time: per step no tensor op beyond the loss itself,
    # where each would cost ~5-20 us on a CPU whose caches the step has just evicted.
    counted_losses: list[torch.Tensor] = []
    counted_steps: list[int] = []
    skip_nonfinite, skipped_steps = t.nonfinite == "skip", 0
    interval_start, data_wait, steps_in_interval = time.perf_counter(), 0.0, 0

    def summed_losses(weights_ok: torch.Tensor | None = None, step: int = 0) -> list[float]:
        """This interval's step losses summed over ranks, in one all-reduce that also finds the
        first step whose loss (or, at `step`, whose weights) went non-finite on any rank: a
        NaN or Inf on one rank stays one in the sum. Every rank counts the same steps."""
        values = torch.stack(counted_losses) if counted_losses else torch.zeros(0, device=device)
        steps = list(counted_steps)
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
        return sums[: len(counted_losses)]

    run.train_mode()
    for step in range(start_step + 1, end_step + 1):
        step_loss, waited = forward_backward(run, amp)
        data_wait += waited

        stop_signal = run.stop.poll(step)  # the same answer on every rank
        log_now = step % t.log_every == 0 or step == end_step or stop_signal is not None
        update, grad_norm = optimizer_step(run, params, step_loss, measure_norm=log_now, skip_nonfinite=skip_nonfinite)
        if update:
            counted_losses.append(step_loss)
            counted_steps.append(step)
        else:
            skipped_steps += 1
        run.components.after_step(run, step)  # prune.sparsity's masks, users' callbacks
        run.scheduled_gc.after_step(step)  # every rank collects at the same steps
        steps_in_interval += 1

        if log_now:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the interval's time includes its queued kernels
            step_sums = summed_losses()  # NaN mean when nonfinite=skip skipped the whole interval
            loss_mean = sum(step_sums) / (env.world_size * plan.batch.accum * len(step_sums) or math.nan)
            elapsed = time.perf_counter() - interval_start
            speed = {"samples_per_s": plan.batch.global_batch * steps_in_interval / elapsed}
            if tokens_per_sample:
                speed["tokens_per_s"] = speed["samples_per_s"] * tokens_per_sample
                if model_flops and peak:
                    speed["mfu"] = mfu(speed["tokens_per_s"] / env.world_size, model_flops, peak)
            memory = {"param_optim_mb": param_and_optimizer_bytes(model, optimizer) / 2**20}  # this rank's
            if device.type == "cuda":  # the fullest rank's peaks over this interval, its retries
                allocator = device_memory(torch.cuda.memory_stats(device))
                fullest = all_reduce_max(torch.tensor(list(allocator.values()), device=device)).tolist()
                memory.update(zip(allocator, fullest, strict=True))
                torch.cuda.reset_peak_memory_stats(device)
            logger.log(
                step,
                {
                    "loss": loss_mean,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": full_tensor(grad_norm).item(),
                    "epoch": data.train.epoch,
                    **({"skipped_steps": skipped_steps} if skip_nonfinite else {}),
                    **({"bad_samples": data.train.bad_samples()} if cfg.data.skip_bad_samples else {}),
                    **speed,
                    **memory,
                    "step_time": elapsed / steps_in_interval,
                    "data_wait_fraction": data_wait / elapsed,
                },
            )
            counted_losses.clear()
            counted_steps.clear()
            interval_start, data_wait, steps_in_interval = time.perf_counter(), 0.0, 0

        eval_due = ((t.eval_every and step % t.eval_every == 0) or step == end_step) and stop_signal is None
        checkpoint_due = run.checkpointer.due(step, end_step, stop_signal is not None)
        if (eval_due or checkpoint_due) and device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's queued kernels are training time, not pause
        pause_start = time.perf_counter()  # evaluation and saving do not count as training time
        if eval_due:
            # Each rank's BatchNorm statistics drifted with its own batches: evaluate rank 0's.
            broadcast_buffers(strategy.unwrap(model))
            files = (cfg.run_dir, f"step_{step:08d}") if env.is_main else None  # rank 0 writes them
            evaluated, eval_args = strategy.unwrap(model), (run.inputs_to_device, device, amp)
            with run.components.eval_weights(run):  # train.ema's average, where kept
                result.eval_metrics = evaluate(evaluated, task, data.val_loader, *eval_args, t.eval_batches, files)
            logger.log(step, result.eval_metrics)
            run.train_mode()
            # Components see the run's own schedule only, not the extra evaluation at an
            # invocation's end (train.stop_at_step): decisions must not depend on where it resumed.
            if (t.eval_every and step % t.eval_every == 0) or step == plan.last_step:
                run.components.after_eval(run, step, result.eval_metrics)
                result.early_stop = _agreed_stop(run.components.stop_reason(), env)
                checkpoint_due = checkpoint_due or result.early_stop is not None

        if checkpoint_due:
            # A finite loss can still come with an update that made the weights non-finite.
            weights_ok = torch.stack([local_shard(p.detach()).isfinite().all() for p in params]).all()
            summed_losses(weights_ok, step)  # never let a NaN model replace the last good checkpoint
            run.components.before_save(run, step)
            save_start = time.perf_counter()
            final = step == end_step or stop_signal is not None or result.early_stop is not None
            result.checkpoint = run.checkpointer.save(step, final)
            logger.log(step, {"checkpoint_stall_s": time.perf_counter() - save_start})  # what training waited
        interval_start += time.perf_counter() - pause_start
        result.step = step
        if stop_signal is not None and step < end_step:
            logger.message(f"stopped at step {step} on {stop_signal}, checkpoint saved; the same command continues")
            result.stopped_by = stop_signal
            break
        if result.early_stop is not None:
            logger.message(f"{result.early_stop}; checkpoint saved")
            break
    run.components.at_end(run, result.step)
    return result


def _agreed_stop(reason: str | None, env: DistEnv) -> str | None:
    """A component's stop, agreed by every rank (a user's callback may answer on one rank only):
    one small all-reduce per evaluation."""
    if not env.is_distributed:
        return reason
    anyone = all_reduce_max(torch.tensor(int(reason is not None), device=env.device)).item()
    return (reason or "a component on another rank asked the run to stop") if anyone else None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    loader,
    inputs_to_device: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    amp: ContextManager,
    max_batches: int | None = None,
    save_to: tuple[Path, str] | None = None,
) -> dict[str, float]:
    """The task's loss and metrics over the validation split (or the first max_batches of each
    rank's shard, always the same ones), summed across ranks so every rank gets the same numbers.
    `save_to`, given on rank 0 only: (directory, tag) for what the metrics keep as files (a
    confusion matrix: directory/confusion/tag.csv and .png).

    Every rank runs the same number of forwards (a sharded model all-gathers inside each one);
    a rank whose shard ran out repeats its last batch without counting it. The metric states
    are then summed in one all-reduce that every rank makes (torchmetrics' own sync is off).
    """
    model.eval()
    evaluation = task.evaluation()
    own_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    rounds = int(all_reduce_max(torch.tensor(own_batches, device=device)).item())
    batches = iter(loader)
    for index in range(rounds):
        counted = index < own_batches
        if counted:
            inputs, targets = next(batches)
            inputs, targets = inputs_to_device(inputs), targets.to(device, non_blocking=True)
        with amp:
            loss_sum, count, outputs = task.eval_forward(model, inputs, targets)
        if counted:
            evaluation.update(loss_sum, count, outputs, targets)
    evaluation.all_reduce(all_reduce_sum)
    if save_to is not None:
        evaluation.save(*save_to)
    return evaluation.compute()
