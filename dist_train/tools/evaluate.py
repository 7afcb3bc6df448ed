"""`dist-train eval RUN_DIR`: a checkpoint's metrics on the run's validation (or training) split.

The run's config.yaml plus key=value overrides builds the data and the model as training did
(train/assembly.py: assemble); only the model is read from the checkpoint, through DCP, which
reshards whatever strategy and world size wrote it. Evaluation is the trainer's own
`evaluate`, so the numbers are those training logs, on any number of processes.

Every mistake in what was asked (no such run, no valid checkpoint, no checkpoint at --step, a
corrupt one, a bad override, an --out that holds files) is found before anything is written;
results go to a folder of their own and never replace a file.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dist_train import checkpoint
from dist_train.checkpoint.export import weights_checkpoint
from dist_train.config import Config, UserError, load_config
from dist_train.data import Batch
from dist_train.data.loader import DataPipeline, load_datasets
from dist_train.distributed import DistEnv, on_rank0, process_group, read_env
from dist_train.train.assembly import assemble, device_strategy, fixed_lr
from dist_train.train.evaluation import evaluate_run

# val: the split training validates on; train: the training samples through the evaluation
# transform (no augmentation), as a check of fit against the validation numbers.
SPLITS = ("val", "train")


@dataclass
class EvalResult:
    checkpoint: Path
    step: int
    split: str
    samples: int
    metrics: dict[str, float]  # named for the split: val_acc, or train_acc for --split train
    out: Path | None  # where rank 0 wrote metrics.json and the confusion matrix; None elsewhere


def eval_config(run_dir: Path, overrides: list[str], world_size: int) -> Config:
    """The run's config.yaml with the overrides, set up to evaluate on `world_size` processes."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{run_dir} is not a run directory: it has no config.yaml")
    cfg = load_config(saved, overrides)
    # Several processes keep FSDP's sharding where the run had it (a model too big for one
    # device stays sharded); otherwise each holds a replica (ddp: the launcher's checks accept
    # it for any world size; _run_eval does not wrap it). One process needs no wrapper.
    strategy = "none" if world_size == 1 else ("fsdp" if cfg.parallel.strategy == "fsdp" else "ddp")
    return dataclasses.replace(
        cfg,
        # The run is where RUN_DIR says, whatever directory the training command ran from.
        run=dataclasses.replace(cfg.run, output_dir=str(run_dir.resolve().parent), name=run_dir.resolve().name),
        # Without gradients HSDP's replicas buy nothing: FSDP shards over every process.
        parallel=dataclasses.replace(cfg.parallel, strategy=strategy, replicate_degree=1),
        # Evaluation resumes nothing: a run trained with resume=never must not refuse its own checkpoints.
        checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"),
    )


def check_out(out: Path | None) -> None:
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder; nothing is overwritten")


def prepare(run_dir: Path, overrides: list[str], step: int | None, out: Path | None, world_size: int) -> Config:
    """Every check on what was asked, before any process starts or anything is written."""
    cfg = eval_config(run_dir, overrides, world_size)
    weights_checkpoint(run_dir, step)
    check_out(out)
    return cfg


def _out_dir(run_dir: Path, out: Path | None, split: str, step: int) -> Path:
    """--out, or RUN_DIR/eval/SPLIT-step_N (.2, .3, ... beside an earlier evaluation's)."""
    check_out(out)
    if out is not None:
        return out
    base = run_dir / "eval" / f"{split}-step_{step:08d}"
    target, k = base, 2
    while target.exists():
        target, k = base.with_name(f"{base.name}.{k}"), k + 1
    return target


def run_eval(
    run_dir: Path, overrides: list[str], step: int | None = None, split: str = "val", out: Path | None = None
) -> EvalResult:
    """Evaluate in this process: one of torchrun's workers, or alone. Rank 0 prints the table
    and writes the files."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = eval_config(run_dir, overrides, read_env()[2])
    with process_group(cfg.parallel.collective_timeout_s, cfg.parallel.backend) as env:
        return _run_eval(cfg, env, run_dir, overrides, step, split, out)


def _run_eval(
    cfg: Config, env: DistEnv, run_dir: Path, overrides: list[str], step: int | None, split: str, out: Path | None
) -> EvalResult:
    def locate() -> tuple[Path, int, Path]:
        source = weights_checkpoint(run_dir, step)  # verified against its manifest
        found = checkpoint.step_of(source)
        return source, found, _out_dir(run_dir, out, split, found)

    source, found_step, out_dir = on_rank0(env, locate)  # one rank hashes the checkpoint
    parts = build_parts(cfg, env, split, lambda model: checkpoint.load_model(source, model))
    tag = f"step_{found_step:08d}"  # the confusion matrix's file name, as training names it
    values = parts.evaluate(parts.model, (out_dir, tag) if env.is_main else None)
    # Named for the split evaluated: val_acc for val, train_acc for train.
    metrics = {re.sub(r"^val_", f"{split}_", name): value for name, value in values.items()}
    samples = len(parts.data.val_loader.loader.dataset)
    result = EvalResult(source, found_step, split, samples, metrics, out_dir if env.is_main else None)
    if env.is_main:
        _report(result, overrides, env.world_size)
    return result


@dataclass
class EvalParts:
    """What evaluating a run's model takes, rebuilt from its config as training built it."""

    model: nn.Module  # the strategy's unwrapped model, weights loaded
    data: DataPipeline
    to_device: Callable[[torch.Tensor], torch.Tensor]  # a loader's inputs as the model takes them
    # evaluate(model, save_to): the trainer's evaluate over the split with this run's task,
    # input layout and precision; any model taking the same inputs (a quantized copy) fits.
    evaluate: Callable[[nn.Module, tuple[Path, str] | None], dict[str, float]]


def build_parts(cfg: Config, env: DistEnv, split: str, load: Callable[[nn.Module], None]) -> EvalParts:
    """The data and the model of `cfg` with `load(model)` filling its weights (a checkpoint or
    an exported file), and the evaluation that eval and quantize share."""
    strategy = device_strategy(cfg, env, trains=False)
    datasets = None
    if split == "train":  # the training samples in the validation slot: no augmentation, every one once
        loaded = load_datasets(cfg.data, env)
        datasets = dataclasses.replace(loaded, val=loaded.train, baseline_val_loss=None)
    # Only the validation side is read: the training side's batch (an `auto` micro-batch, the
    # accumulation) needs no plan, and one sample per rank fits any training set. resuming:
    # the weights are load()'s, so model.init_from is not read.
    run = assemble(cfg, env, strategy, Batch(env.world_size, 1, 1), datasets, lr_factor=fixed_lr, resuming=True)
    load(run.model)

    def evaluate_model(model: nn.Module, save_to: tuple[Path, str] | None) -> dict[str, float]:
        return evaluate_run(run, model, save_to)

    return EvalParts(strategy.unwrap(run.model), run.data, run.inputs_to_device, evaluate_model)


def _report(result: EvalResult, overrides: list[str], world_size: int) -> None:
    assert result.out is not None
    result.out.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": str(result.checkpoint),
        "step": result.step,
        "split": result.split,
        "samples": result.samples,
        "processes": world_size,
        "overrides": overrides,
        "metrics": result.metrics,
    }
    (result.out / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    print(f"{result.checkpoint} (step {result.step}), {result.split} split: {result.samples} samples on {processes}")
    rows = [("metric", "value"), *((name, f"{value:.6g}") for name, value in result.metrics.items())]
    left, right = (max(len(row[i]) for row in rows) for i in (0, 1))
    rows.insert(1, ("-" * left, "-" * right))
    for name, value in rows:
        print(f"| {name:<{left}} | {value:<{right}} |")
    files = sorted(str(p.relative_to(result.out)) for p in result.out.rglob("*") if p.is_file())
    print(f"wrote {result.out}: {', '.join(files)}")
