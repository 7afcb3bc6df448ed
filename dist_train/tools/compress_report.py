"""The report every model-shrinking command ends with (quantize now, prune later): for the
original and each result, validation accuracy, file size, weight sparsity and CPU latency, with
the change against the original, as one table printed and written as compress_report.md and
compress_report.json.

A command hands `compare` the original and its results as (name, model, file) and a Validation
(how to evaluate a model on the full validation split, and one batch of its inputs for timing).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dist_train.distributed import DistEnv
from dist_train.errors import UserError
from dist_train.tools.evaluate import build_parts

Candidate = tuple[str, nn.Module, Path]  # (name in the table, model, the file it is stored in)
BATCHES = (1, 32)
WARMUP = 3


@dataclass
class Validation:
    accuracy: Callable[[nn.Module], float]  # top-1 accuracy over the full validation split
    example: torch.Tensor  # a batch of validation inputs as the model takes them, for timing


@dataclass
class Row:
    name: str
    file: str
    accuracy: float
    size_bytes: int
    sparsity: float  # fraction of exact zeros over the weights (quantized: their integer values)
    latency_ms: dict[str, float]  # batch size -> median milliseconds per forward
    accuracy_change: float  # against the original, in absolute accuracy
    size_ratio: float  # size / original size
    latency_ratio: dict[str, float]  # latency / original latency, per batch size
    flagged: bool  # lost more accuracy than allowed


@dataclass
class Report:
    rows: list[Row]  # the original first
    threads: int
    timed_runs: int
    max_accuracy_drop: float
    date: str

    @property
    def flagged(self) -> list[Row]:
        return [row for row in self.rows if row.flagged]


def check_options(timing_runs: int, max_accuracy_drop: float) -> None:
    """The report's options, checked before a command does any work."""
    if timing_runs < 1:  # a median of nothing fails deep in statistics
        raise UserError(f"--timing-runs must be at least 1, got {timing_runs}")
    # Absolute accuracy: above 1 nothing could be flagged (a percentage by mistake); a negative
    # allowance demands a gain.
    if not max_accuracy_drop <= 1:  # NaN too
        raise UserError(f"--max-accuracy-drop is absolute accuracy, at most 1, got {max_accuracy_drop:g}")


def compare(
    original: Candidate, results: list[Candidate], validation: Validation, max_accuracy_drop: float, runs: int = 30
) -> Report:
    """Measure the original and every result the same way (same inputs, threads, repetitions)."""
    measured = [_measure(candidate, validation, runs) for candidate in [original, *results]]
    base = measured[0]
    rows = []
    for name, file, accuracy, size, sparsity, latency in measured:
        change = accuracy - base[2]
        rows.append(
            Row(
                name,
                str(file),
                accuracy,
                size,
                sparsity,
                latency,
                change,
                size / base[3],
                {b: latency[b] / base[5][b] for b in latency},
                # The original is the reference; a float tolerance keeps an identical result unflagged at 0.
                flagged=name != base[0] and -change > max_accuracy_drop + 1e-12,
            )
        )
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    return Report(rows, torch.get_num_threads(), runs, max_accuracy_drop, today)


def _measure(
    candidate: Candidate, validation: Validation, runs: int
) -> tuple[str, Path, float, int, float, dict[str, float]]:
    name, model, file = candidate
    accuracy = validation.accuracy(model)
    latency = {str(b): median_latency_ms(model, batch_of(validation.example, b), runs) for b in BATCHES}
    return name, file, accuracy, os.path.getsize(file), sparsity(model), latency


def batch_of(example: torch.Tensor, size: int) -> torch.Tensor:
    """`size` inputs from the example batch, repeated when it holds fewer."""
    reps = -(-size // len(example))
    return example.repeat(reps, *([1] * (example.dim() - 1)))[:size].contiguous()


def median_latency_ms(model: nn.Module, inputs: torch.Tensor, runs: int) -> float:
    """Median wall time of one forward, after warm-up runs (first calls allocate and pick kernels)."""
    times = []
    with torch.inference_mode():
        for i in range(WARMUP + runs):
            start = time.perf_counter()
            model(inputs)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The values a model's weights are stored as: float weights, or the integer data of
    quantized ones (torchao's tensors keep it in .qdata; an exported PT2E program holds int8
    constants). Biases, norms' statistics and quantization scales are not weights."""
    found = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = getattr(tensor, "qdata", tensor)
        if name.endswith("weight") or data.dtype == torch.int8:
            found.append(data)
    return found


def sparsity(model: nn.Module) -> float:
    tensors = weight_tensors(model)
    total = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / total if total else 0.0


def table(report: Report) -> str:
    head = ["model", "file", "size", "val acc", "Δ acc", "sparsity"]
    head += [f"{label} b{b}" for b in BATCHES for label in ("ms", "×")] + ["flag"]
    lines = [head]
    for row in report.rows:
        cells = [row.name, Path(row.file).name, _size(row.size_bytes) + f" (×{row.size_ratio:.2f})"]
        cells += [f"{row.accuracy:.4f}", f"{row.accuracy_change:+.4f}", f"{row.sparsity:.4f}"]
        for b in BATCHES:
            cells += [f"{row.latency_ms[str(b)]:.3f}", f"{row.latency_ratio[str(b)]:.2f}"]
        cells.append(f"drop > {report.max_accuracy_drop:g}" if row.flagged else "")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    lines.insert(1, ["-" * w for w in widths])
    text = "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines)
    note = (
        f"CPU latency: median of {report.timed_runs} forwards after {WARMUP} warm-up ones, "
        f"{report.threads} thread(s) (torch.get_num_threads()), {report.date}; × is against the original."
    )
    return f"{text}\n\n{note}\n"


def write(report: Report, directory: Path) -> None:
    (directory / "compress_report.md").write_text(table(report))
    (directory / "compress_report.json").write_text(json.dumps(asdict(report), indent=1) + "\n")


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def cpu_validation(cfg, load: Callable[[nn.Module], None]) -> tuple[nn.Module, Validation, object]:
    """The run's model (weights filled by `load`) in one CPU process and fp32, and the Validation
    every candidate is measured with: the report is about CPU inference, whatever the run trained
    with. Returns (model in eval mode, validation, the eval parts: data and evaluation)."""
    train = dataclasses.replace(cfg.train, eval_batches=None, precision="fp32", channels_last=False)
    # One process holds the whole model, whatever strategy trained it (DCP reads any sharding).
    parallel = dataclasses.replace(cfg.parallel, strategy="none")
    cfg = dataclasses.replace(cfg, train=train, parallel=parallel)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    parts = build_parts(cfg, env, "val", load)
    example = parts.to_device(next(iter(parts.data.val_loader))[0])

    def accuracy(candidate: nn.Module) -> float:
        metrics = parts.evaluate(candidate, None)
        if "val_acc" not in metrics:
            raise UserError(f"the report needs accuracy, and train.metrics of this run has no acc: {sorted(metrics)}")
        return metrics["val_acc"]

    return parts.model.eval(), Validation(accuracy, example), parts
