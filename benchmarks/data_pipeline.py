"""How much of a training step waits for data, and how fast the loader is on its own.

    python benchmarks/data_pipeline.py                          # the default configs, 1 and 2 processes
    python benchmarks/data_pipeline.py --workers 0 1 2          # sweep data.num_workers

For each config and process count:
- loader alone: one rank's training loader (its shard of the sampler, its augmentation,
  collation) drained as fast as it goes, in samples/s per rank, after a warm-up epoch start;
- in training: a real run through the CLI (logging on, evaluation and checkpoints off) and
  the fraction of its step time spent in `next_micro_batch`, which the trainer logs as
  `data_wait_fraction` every `train.log_every` steps (the first interval, warm-up, dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_train.config import load_config  # noqa: E402
from dist_train.data import build_pipeline  # noqa: E402
from dist_train.distributed import DistEnv  # noqa: E402

CONFIGS = ("configs/digits.yaml", "configs/gpt_cpu.yaml")


def loader_alone(config: str, overrides: list[str], nproc: int, batches: int) -> float:
    """Samples/s of rank 0's training loader by itself."""
    cfg = load_config(REPO / config, overrides)
    env = DistEnv(rank=0, local_rank=0, world_size=nproc, device=torch.device("cpu"))
    data = build_pipeline(cfg.data, env, cfg.train.grad_accum_steps, cfg.run.seed)
    data.train.next_micro_batch()  # starts the workers, if any
    start = time.perf_counter()
    for _ in range(batches):
        data.train.next_micro_batch()
    return batches * cfg.data.batch_size / (time.perf_counter() - start)


def in_training(config: str, overrides: list[str], nproc: int, steps: int) -> tuple[float, float]:
    """(data wait fraction, samples/s) of a real run, medians over its logging intervals."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    with tempfile.TemporaryDirectory() as tmp:
        run = [f"run.output_dir={tmp}", f"train.max_steps={steps}", "train.log_every=25",
               "train.eval_every=0", "checkpoint.every_steps=0", "logging.wandb.mode=disabled",
               "train.progress_bar=false", *overrides]  # fmt: skip
        cli = [sys.executable, "-m", "dist_train.cli"]
        launch = ["launch", config, "--nproc-per-node", str(nproc)]
        cmd = [*cli, "train", config, *run] if nproc == 1 else [*cli, *launch, *run]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{config} x{nproc} failed:\n{proc.stderr[-2000:]}")
        metrics = next(Path(tmp).glob("*/metrics.jsonl"))
        records = [r for r in map(json.loads, metrics.read_text().splitlines()) if "data_wait_fraction" in r][1:]
        return (
            statistics.median(r["data_wait_fraction"] for r in records),
            statistics.median(r["samples_per_s"] for r in records),
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[None], help="data.num_workers (default: config's)")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()

    print("| config | processes | data.num_workers | loader alone (samples/s) | training (samples/s) | data wait |")
    print("| --- | --- | --- | --- | --- | --- |")
    for config in args.configs:
        for nproc in args.nproc:
            for workers in args.workers:
                overrides = [] if workers is None else [f"data.num_workers={workers}"]
                shown = workers if workers is not None else f"{load_config(REPO / config).data.num_workers} (default)"
                alone = loader_alone(config, overrides, nproc, batches=200)
                wait, speed = in_training(config, overrides, nproc, args.steps)
                row = f"| `{Path(config).name}` | {nproc} | {shown} | {alone:,.0f} | {speed:,.0f} | {wait:.1%} |"
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
