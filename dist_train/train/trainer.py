"""`train`: one invocation of a run, in this process.

Read it top to bottom: the plan (plan.py) decides what this invocation does, assemble
(assembly.py) builds the run's parts, the Checkpointer restores a checkpoint's declared state,
the run directory opens, and the loop (loop.py) trains. Everything derived from the config is
the plan's; the config stays as the user wrote it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist

from dist_train import checkpoint
from dist_train.components import build_components
from dist_train.config import Config, UserError, dump_yaml, resolve_auto, to_dict
from dist_train.data.loader import load_datasets
from dist_train.distributed import DistEnv, broadcast_object, is_timeout, on_rank0, process_group, unresponsive_ranks
from dist_train.logger import RunLogger, new_wandb_run_id
from dist_train.preemption import STOPPED_MARKER, StopRequest
from dist_train.process_settings import ScheduledGC, deterministic_algorithms, retain_freed_host_memory
from dist_train.train.assembly import Run, UserParts, assemble, device_strategy
from dist_train.train.checkpointer import Checkpointer, SchedulePosition
from dist_train.train.interval import NonFiniteLossError
from dist_train.train.loop import TrainResult, fit
from dist_train.train.plan import Plan, make_plan

__all__ = ["NonFiniteLossError", "TrainResult", "train"]


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
    strategy = device_strategy(cfg, env)
    datasets = parts.datasets if parts.datasets is not None else load_datasets(cfg.data, env)
    plan = make_plan(cfg, env, strategy, datasets, parts)
    resume = plan.resume
    run = assemble(
        cfg, env, strategy, plan.batch, datasets, parts, last_step=plan.last_step, resuming=resume is not None
    )
    # Built before a resume restores their state; prune.sparsity's masks wait for on_start.
    run.components = build_components(
        cfg, strategy.unwrap(run.model), env.rank, plan.start_step, plan.last_step, parts.callbacks
    )
    wandb_run_id = broadcast_object(new_wandb_run_id() if resume is None else resume.state["wandb_run_id"])
    run.checkpointer = _checkpointer(run, plan, wandb_run_id)
    if resume is not None:
        run.checkpointer.restore(resume.path, resume.state, run.fused, not plan.world_changed, cfg.run.seed)

    run.logger = on_rank0(env, lambda: _open_run_dir(run, plan, wandb_run_id), share=False) or run.logger
    run.components.put_first(run.logger)  # every record reaches the loggers first (on_log)
    failed = True
    try:
        _describe(run, plan)
        run.checkpointer.start(cfg.parallel.collective_timeout_s, run.logger.message)  # checkpoint.async_save's writer
        run.stop = StopRequest([cfg.checkpoint.preempt_signal, "SIGTERM"], cfg.parallel.collective_timeout_s)
        with run.stop, ScheduledGC(cfg.train.gc_every_steps) as run.scheduled_gc:
            try:
                result = fit(run, plan)
            except (RuntimeError, dist.DistError) as exc:
                if not (env.is_distributed and is_timeout(exc)):
                    raise
                raise _timeout_error(exc, cfg.parallel.collective_timeout_s, run.stop.group) from None
        _finish(run, plan, result)
        failed = False
        return result
    finally:
        run.checkpointer.close()  # after a failure: no write left running while the process group goes
        run.logger.close(exit_code=1 if failed else 0)


def _checkpointer(run: Run, plan: Plan, wandb_run_id: str) -> Checkpointer:
    """A checkpoint holds model and optimizer (DCP), these parts' states under their names (saved
    and restored from this one declaration), and what it records about the run."""
    stateful = {
        "scheduler": SchedulePosition(run.scheduler), "scaler": run.scaler, "data": run.data.train,
        "components": run.components,
    }  # fmt: skip
    record = {
        "wandb_run_id": wandb_run_id,
        "config": to_dict(run.cfg),  # as the user wrote it
        "plan": plan.of_the_run(),
        # The batch as it ran, read by resume checks (data.batch_size=auto resumes with it).
        "world_size": run.env.world_size, "global_batch": plan.batch.global_batch, "micro_batch": plan.batch.micro,
    }  # fmt: skip
    root = run.cfg.run_dir / "checkpoints"
    return Checkpointer(
        run.cfg.checkpoint, root, run.env, run.model, run.optimizer, stateful, record, run.components.tensors
    )


def _open_run_dir(run: Run, plan: Plan, wandb_run_id: str) -> RunLogger:
    """Rank 0, once the run is set up: a failed start leaves nothing behind."""
    cfg, run_dir = run.cfg, run.cfg.run_dir
    _make_dir(run_dir)
    (run_dir / STOPPED_MARKER).unlink(missing_ok=True)  # from an earlier early stop
    # After a rewind to an older checkpoint, newer ones belong to the abandoned future:
    # moved aside (not deleted), so `resume: auto` and pruning never mistake them for ours.
    for path in checkpoint.set_aside_newer(run_dir / "checkpoints", plan.start_step):
        print(f"set aside {path.name} (newer than the step {plan.start_step} this run resumes from)", flush=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))  # as the user wrote it
    (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1) + "\n")  # as it runs here
    return RunLogger(cfg, run_dir, True, wandb_run_id, plan.start_step, plan.last_step)


def _describe(run: Run, plan: Plan) -> None:
    """What the run log says before the first step."""
    for line in plan.describe() + run.notes + run.components.notes:
        run.logger.message(line)
    settings = [run.strategy.name, run.cfg.train.precision]
    settings += ["channels_last"] if run.channels_last else []
    settings += ["fused optimizer"] if run.fused else []
    settings += [f"process group {dist.get_backend()}"] if dist.is_initialized() else []
    settings += [f"loss {run.task.name}"]
    run.logger.message(
        f"training {plan.last_step} steps of {plan.batch.describe()} on {run.env.device}, {', '.join(settings)}"
    )
    mesh = run.strategy.describe_mesh()
    if mesh:
        run.logger.message(mesh)
    if run.data.baseline_val_loss is not None:
        run.logger.message(
            f"baseline: val_loss={run.data.baseline_val_loss:.4g} predicting from token frequencies alone"
        )


def _finish(run: Run, plan: Plan, result: TrainResult) -> None:
    if result.step == plan.last_step > plan.start_step or result.early_stop:  # the run is done
        batch = plan.batch  # as it ran: data.batch_size=auto and train.global_batch resolved
        shape = {"world_size": batch.world_size, "micro_batch": batch.micro, "grad_accum_steps": batch.accum}
        run.logger.finished({**shape, "global_batch": batch.global_batch})
    if result.stopped_by and run.env.is_main:
        marker = {"step": result.step, "signal": result.stopped_by, "checkpoint": str(result.checkpoint)}
        (run.cfg.run_dir / STOPPED_MARKER).write_text(json.dumps(marker) + "\n")


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
