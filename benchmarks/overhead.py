"""Throughput of dist_train against a hand-written PyTorch loop, Lightning Fabric and Hugging
Face Accelerate on the same workload, in one invocation, as ratios to the hand-written loop.

    python benchmarks/overhead.py                       # 1 and 2 processes, fp32 and bf16
    python benchmarks/overhead.py --reps 5 --out results.json

Workload: the seed CNN (conv 6/16, fc 120/84/10) on CIFAR-shaped in-memory tensors, batch 64
per rank, SGD with momentum, CPU and gloo. dist_train runs through its CLI with its normal
logging (every 30 steps: a loss all-reduce and metrics.jsonl) and stop-signal agreement on;
its periodic checkpoints are off here (it saves once, after the measured steps), since their
cost is a separate question. Every run excludes its warm-up steps. Repetitions are interleaved
so machine noise hits all frameworks alike; the table gives the median samples/s, the ratio to
the hand-written loop and the min-max spread. Fabric and Accelerate are optional
(pip install -e ".[bench]") and are skipped with a note when absent.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("plain", "dist_train", "fabric", "accelerate")
OPTIONAL = {"fabric": ("lightning_fabric", "lightning"), "accelerate": ("accelerate",)}


def command(framework: str, nproc: int, precision: str, warmup: int, steps: int, out_dir: Path) -> list[str]:
    if framework == "dist_train":
        overrides = [
            f"run.output_dir={out_dir}",
            f"train.precision={precision}",
            f"train.max_steps={warmup + steps}",
            f"train.log_every={warmup}",
            "logging.wandb.mode=disabled",
            "train.progress_bar=false",
            f"parallel.strategy={'ddp' if nproc > 1 else 'none'}",
        ]
        return [sys.executable, "-m", "dist_train.cli", "launch", "configs/synthetic.yaml",
                "--nproc-per-node", str(nproc), *overrides]  # fmt: skip
    worker = [str(REPO / "benchmarks" / "loops.py"), "--framework", framework, "--precision", precision,
              "--warmup", str(warmup), "--steps", str(steps)]  # fmt: skip
    if nproc == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker]


def measure(framework: str, nproc: int, precision: str, warmup: int, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = command(framework, nproc, precision, warmup, steps, Path(tmp))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{framework} x{nproc} {precision} failed:\n{proc.stderr[-2000:]}")
        if framework != "dist_train":
            return json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_s"]
        # Wall-clock time between the log lines at the end of warm-up and at the last step.
        lines = (Path(tmp) / "synthetic" / "metrics.jsonl").read_text().splitlines()
        logged = {r["step"]: r["time"] for r in map(json.loads, lines) if "loss" in r}
        return steps * 64 * nproc / (logged[warmup + steps] - logged[warmup])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=None, help="write all measurements as JSON here")
    args = parser.parse_args()

    skipped = [f for f, modules in OPTIONAL.items() if not any(importlib.util.find_spec(m) for m in modules)]
    for framework in skipped:
        print(f"note: {framework} skipped ({OPTIONAL[framework][0]} is not installed; pip install -e '.[bench]')")
    frameworks = [f for f in FRAMEWORKS if f not in skipped]
    cases = [(n, p) for n in args.nproc for p in args.precision]
    results: dict[str, list[float]] = {}
    for rep in range(args.reps):
        for nproc, precision in cases:
            # Rotate the order each repetition, so no framework always runs first or last.
            order = frameworks[rep % len(frameworks) :] + frameworks[: rep % len(frameworks)]
            for framework in order:
                value = measure(framework, nproc, precision, args.warmup, args.steps)
                results.setdefault(f"{framework}|{nproc}|{precision}", []).append(value)
                print(f"rep {rep + 1}/{args.reps} {framework:>10} x{nproc} {precision}: {value:8.0f} samples/s")

    print(f"\n{args.steps} measured steps after {args.warmup} warm-up, {args.reps} interleaved repetitions; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print("| processes | precision | framework | samples/s (median) | vs. hand-written | min-max |")
    print("| --- | --- | --- | --- | --- | --- |")
    table = []
    for nproc, precision in cases:
        baseline = statistics.median(results[f"plain|{nproc}|{precision}"])
        for framework in frameworks:
            values = results[f"{framework}|{nproc}|{precision}"]
            median = statistics.median(values)
            row = {"nproc": nproc, "precision": precision, "framework": framework, "median": median,
                   "ratio": median / baseline, "min": min(values), "max": max(values), "values": values}  # fmt: skip
            table.append(row)
            print(f"| {nproc} | {precision} | {framework} | {median:.0f} | {median / baseline:.3f}x | "
                  f"{min(values):.0f}-{max(values):.0f} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"steps": args.steps, "warmup": args.warmup, "rows": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
