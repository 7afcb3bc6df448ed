"""Throughput of dist_train against a hand-written PyTorch loop, Lightning Fabric and Hugging
Face Accelerate on the same workload, in one invocation, as ratios to the hand-written loop.

    python benchmarks/overhead.py                       # every workload, 10 repetitions
    python benchmarks/overhead.py --workloads cnn --reps 5 --out results.json
    python benchmarks/overhead.py --allocator retained  # only the equal-allocator comparison

Workloads (benchmarks/loops.py holds the hand-written, Fabric and Accelerate versions):
- cnn: the seed CNN (conv 6/16, fc 120/84/10) on CIFAR-shaped in-memory tensors, batch 64 per
  rank, SGD with momentum; 1 and 2 processes (torchrun, gloo), fp32 and bf16 autocast; all four.
- resnet18: ResNet-18 (32x32 stem) on the same data, batch 32, 1 process: compute-heavy, so
  overhead should vanish; hand-written vs. dist_train.
- gpt: the 4-layer GPT of configs/gpt_cpu.yaml, 16 x 128 tokens, AdamW, clipping at 1.0,
  1 process, in tokens/s; hand-written vs. dist_train.

dist_train runs through its CLI with the config's own `parallel.strategy: ddp` at every process
count: `dist-train launch` for several processes, and for one both `dist-train train` (no
process group) and, as `dist_train_launch`, `dist-train launch --nproc-per-node 1` (torchrun, a
process group of one, where DDP used to wrap the model at a cost of about 10%). Normal
bookkeeping is on: logging every `warmup` steps (a loss all-reduce, a grad-norm and
metrics.jsonl), the NaN check, stop-signal agreement. Periodic checkpoints are off (it saves
once, after the measured steps): their cost is benchmarks/checkpoint_cost.py's question. Every
run excludes its warm-up steps. This 2-core VM's speed drifts by up to 10% over minutes, so
repetitions are interleaved (the order rotates) and each run is compared with the hand-written
run of the same repetition: "vs. hand-written" is the median of those per-repetition ratios,
with their range. The last column, the ratio of the two medians, is the check on it where one
side's runs spread much more widely than the other's. Fabric and Accelerate are optional (pip
install -e ".[bench]") and are skipped with a note when absent.

Allocator: glibc's default returns freed memory to the OS and faults it back in, which on
this CPU costs anywhere from nothing to 30% of a run's throughput, depending on the
run's allocation history. dist_train switches that off in its workers (train.retain_host_memory);
the other loops run as written. `default` measures every loop as its user gets it;
`retained` gives every loop glibc's environment settings with dist_train's values, so that
the ratio is the loops' own overhead. Both are measured by default, interleaved.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dist_train.process_settings import MMAP_THRESHOLD, TRIM_THRESHOLD  # noqa: E402

# glibc reads these at start-up: the settings retain_freed_host_memory() makes with mallopt.
RETAINED = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
ALLOCATORS = ("default", "retained")
FRAMEWORKS = ("plain", "dist_train", "fabric", "accelerate")
ONE_PROCESS_LAUNCH = "dist_train_launch"  # dist_train under torchrun with one worker
OPTIONAL = {"fabric": ("lightning_fabric", "lightning"), "accelerate": ("accelerate",)}


@dataclass(frozen=True)
class Workload:
    config: str  # the dist_train config that trains the same model on the same kind of data
    overrides: tuple[str, ...]
    batch_size: int
    tokens_per_sample: int  # 0: report samples/s
    nproc: tuple[int, ...]
    precision: tuple[str, ...]
    frameworks: tuple[str, ...]
    warmup: int
    steps: int


SYNTHETIC, PLAIN_AND_US = "configs/synthetic.yaml", ("plain", "dist_train")
WORKLOADS = {
    "cnn": Workload(SYNTHETIC, (), 64, 0, (1, 2), ("fp32", "bf16"), FRAMEWORKS, warmup=30, steps=600),
    "resnet18": Workload(SYNTHETIC, ("model.name=resnet18",), 32, 0, (1,), ("fp32",), PLAIN_AND_US, warmup=6, steps=24),
    # The hand-written loop reads random bytes, dist_train the standard library's sources: both
    # slice in-memory token tensors, so the loader costs the same.
    "gpt": Workload("configs/gpt_cpu.yaml", (), 16, 128, (1,), ("fp32",), PLAIN_AND_US, warmup=10, steps=120),
}


def command(w: Workload, name: str, framework: str, nproc: int, precision: str, out_dir: Path) -> list[str]:
    if framework in ("dist_train", ONE_PROCESS_LAUNCH):
        overrides = [
            *w.overrides,
            f"run.output_dir={out_dir}",
            f"data.batch_size={w.batch_size}",
            f"train.precision={precision}",
            f"train.max_steps={w.warmup + w.steps}",
            f"train.log_every={w.warmup}",
            "train.eval_every=0",
            "checkpoint.every_steps=0",
            "logging.wandb.mode=disabled",
            "train.progress_bar=false",
            "parallel.strategy=ddp",  # as the configs ship it, also for one process
        ]
        cli = [sys.executable, "-m", "dist_train.cli"]
        if framework == "dist_train" and nproc == 1:
            return [*cli, "train", w.config, *overrides]
        return [*cli, "launch", w.config, "--nproc-per-node", str(nproc), *overrides]
    worker = [str(REPO / "benchmarks" / "loops.py"), "--framework", framework, "--workload", name,
              "--precision", precision, "--batch-size", str(w.batch_size),
              "--warmup", str(w.warmup), "--steps", str(w.steps)]  # fmt: skip
    if nproc == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker]


def measure(name: str, framework: str, nproc: int, precision: str, allocator: str = "default") -> float:
    """Samples/s over the measured steps of one run."""
    w = WORKLOADS[name]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    for key in RETAINED:
        env.pop(key, None)
    if allocator == "retained":
        env.update(RETAINED)
    # A rare SIGABRT in a two-process run (seen once, in Fabric with bf16) should cost one
    # rerun, in a fresh directory, not the hour of measurements before it.
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                command(w, name, framework, nproc, precision, Path(tmp)),
                cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            if proc.returncode == 0:
                return samples_per_s(w, framework, nproc, proc.stdout, Path(tmp))
        print(f"note: {name} {framework} x{nproc} {precision} exited {proc.returncode} (attempt {attempt})")
    raise RuntimeError(f"{name} {framework} x{nproc} {precision} failed:\n{proc.stderr[-3000:]}")


def samples_per_s(w: Workload, framework: str, nproc: int, stdout: str, out_dir: Path) -> float:
    if framework not in ("dist_train", ONE_PROCESS_LAUNCH):
        return json.loads(stdout.strip().splitlines()[-1])["samples_per_s"]
    # Wall-clock time between the log lines at the end of warm-up and at the last step.
    metrics = next(out_dir.glob("*/metrics.jsonl"))
    logged = {r["step"]: r["time"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r}
    return w.steps * w.batch_size * nproc / (logged[w.warmup + w.steps] - logged[w.warmup])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--allocator", nargs="+", choices=ALLOCATORS, default=list(ALLOCATORS))
    parser.add_argument("--nproc", type=int, nargs="+", default=None, help="only these process counts")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=None, help="only these")
    parser.add_argument("--frameworks", nargs="+", choices=[*FRAMEWORKS, ONE_PROCESS_LAUNCH], default=None)
    parser.add_argument("--out", type=Path, default=None, help="write all measurements as JSON here")
    args = parser.parse_args()

    skipped = [f for f, modules in OPTIONAL.items() if not any(importlib.util.find_spec(m) for m in modules)]
    for framework in skipped:
        print(f"note: {framework} skipped ({OPTIONAL[framework][0]} is not installed; pip install -e '.[bench]')")
    cases = [
        (name, n, p, a)
        for name in args.workloads
        for a in args.allocator
        for n in WORKLOADS[name].nproc
        for p in WORKLOADS[name].precision
        if (args.nproc is None or n in args.nproc) and (args.precision is None or p in args.precision)
    ]
    results: dict[tuple, list[float]] = {}
    for rep in range(args.reps):
        for name, nproc, precision, allocator in cases:
            frameworks = [*WORKLOADS[name].frameworks, *([ONE_PROCESS_LAUNCH] if nproc == 1 else [])]
            wanted = ["plain", *(args.frameworks or frameworks)]  # ratios are to the hand-written loop
            frameworks = [f for f in frameworks if f not in skipped and f in wanted]
            # Rotate the order each repetition, so no framework always runs first or last.
            order = frameworks[rep % len(frameworks) :] + frameworks[: rep % len(frameworks)]
            for framework in order:
                value = measure(name, framework, nproc, precision, allocator)
                results.setdefault((name, nproc, precision, allocator, framework), []).append(value)
                print(
                    f"rep {rep + 1}/{args.reps} {name} x{nproc} {precision} {allocator} {framework:>10}: "
                    f"{value:8.1f} samples/s"
                )

    print(f"\n{args.reps} interleaved repetitions; {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {__import__('torch').__version__}, {time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print(
        "| workload | processes | precision | allocator | framework | throughput (median) | vs. hand-written | "
        "range | median / hand-written median |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")  # fmt: skip
    table = []
    for (name, nproc, precision, allocator, framework), values in results.items():
        w = WORKLOADS[name]
        plain = results[(name, nproc, precision, allocator, "plain")]
        ratios = [v / p for v, p in zip(values, plain, strict=True)]  # same repetition: drift cancels
        unit, scale = ("tokens/s", w.tokens_per_sample) if w.tokens_per_sample else ("samples/s", 1)
        row = {"workload": name, "nproc": nproc, "precision": precision, "allocator": allocator, "framework": framework,
               "median": statistics.median(values) * scale, "unit": unit, "ratio": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios),
               "ratio_of_medians": statistics.median(values) / statistics.median(plain), "values": values}  # fmt: skip
        table.append(row)
        print(f"| {name} | {nproc} | {precision} | {allocator} | {framework} | {row['median']:,.0f} {unit} | "
              f"{row['ratio']:.3f}x | {row['ratio_min']:.2f}-{row['ratio_max']:.2f} | "
              f"{row['ratio_of_medians']:.3f}x |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"reps": args.reps, "rows": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
