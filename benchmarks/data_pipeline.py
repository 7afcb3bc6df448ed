"""How much of a training step waits for data, and how fast the loader is on its own.

    python benchmarks/data_pipeline.py                          # the default configs, 1 and 2 processes
    python benchmarks/data_pipeline.py --workers 0 1 2          # sweep data.num_workers
    python benchmarks/data_pipeline.py --cifar-shaped           # image loading: per sample vs in memory

For each config and process count:
- loader alone: one rank's training loader (its shard of the sampler, its augmentation,
  collation) drained as fast as it goes, in samples/s per rank, after a warm-up epoch start;
- in training: a real run through the CLI (logging on, evaluation and checkpoints off) and
  the fraction of its step time spent in `next_micro_batch`, which the trainer logs as
  `data_wait_fraction` every `train.log_every` steps (the first interval, warm-up, dropped).

`--cifar-shaped` compares, on generated CIFAR-shaped uint8 data (no download), one rank's
training loader as CIFAR-10 was read before (a PIL image per sample, as torchvision's dataset
returns it, through v2 ToImage, ToDtype, RandomCrop(32, padding=4), RandomHorizontalFlip and
Normalize) with the uint8 in-memory path (keyed crop and flip per chunk of micro-batches, then
the normalization the trainer does on the device, timed here on the CPU).
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
from dist_train.data import IN_MEMORY_CHUNK, Batch, RandomShift, build_pipeline  # noqa: E402
from dist_train.data.datasets import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from dist_train.data.loader import DataPipeline, SeededAugment, TrainBatches, collate, uint8_normalization  # noqa: E402
from dist_train.data.sampler import ChunkSampler, ResumableDistributedSampler  # noqa: E402
from dist_train.distributed import DistEnv  # noqa: E402

CONFIGS = ("configs/digits.yaml", "configs/gpt_cpu.yaml")


def loader_alone(config: str, overrides: list[str], nproc: int, batches: int) -> float:
    """Samples/s of rank 0's training loader by itself."""
    cfg = load_config(REPO / config, overrides)
    env = DistEnv(rank=0, local_rank=0, world_size=nproc, device=torch.device("cpu"))
    data = build_pipeline(
        cfg.data, env, Batch(env.world_size, cfg.data.batch_size, cfg.train.grad_accum_steps), cfg.run.seed
    )
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


class PilImages(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 returns per index: a PIL image made from the uint8 array."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images.permute(0, 2, 3, 1).numpy(), labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        return Image.fromarray(self.images[index]), self.labels[index]


def cifar_shaped(samples: int, batch_size: int, batches: int) -> tuple[float, float]:
    """(per-sample samples/s, in-memory samples/s) of one rank's training loader."""
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (samples, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (samples,), generator=g)
    per_sample = v2.Compose([
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.RandomCrop(32, padding=4),
        v2.RandomHorizontalFlip(), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD),
    ])  # fmt: skip
    rates = []
    for dataset, transform, chunk in (
        (PilImages(images, labels), per_sample, 1),
        (torch.utils.data.TensorDataset(images, labels), RandomShift(4, fill=0, flip=True), IN_MEMORY_CHUNK),
    ):
        sampler = ResumableDistributedSampler(samples, 1, 0, seed=0, global_batch=batch_size)
        loader = torch.utils.data.DataLoader(
            SeededAugment(dataset, transform, seed=0),
            batch_sampler=ChunkSampler(sampler, batch_size, chunk),
            collate_fn=collate,
        )
        pipeline = DataPipeline(TrainBatches(loader, sampler, batch_size), None, None, Batch(1, batch_size, 1), None)
        if chunk > 1:
            # normalized as on the device
            pipeline.pixel_offset, pipeline.pixel_scale = uint8_normalization(
                (CIFAR10_MEAN, CIFAR10_STD), torch.device("cpu")
            )
        pipeline.inputs_to_device(pipeline.train.next_micro_batch()[0])  # warm-up: starts the epoch
        start = time.perf_counter()
        for _ in range(batches):
            pipeline.inputs_to_device(pipeline.train.next_micro_batch()[0])
        rates.append(batches * batch_size / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[None], help="data.num_workers (default: config's)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--cifar-shaped", action="store_true", help="only the per-sample vs in-memory comparison")
    args = parser.parse_args()

    if args.cifar_shaped:
        per_sample, in_memory = cifar_shaped(samples=50_000, batch_size=128, batches=100)
        print("| CIFAR-shaped loader alone, batch 128, 1 process, 0 workers | samples/s |")
        print("| --- | --- |")
        print(f"| per sample: PIL + torchvision v2 (before) | {per_sample:,.0f} |")
        print(f"| uint8 in memory: keyed crop + flip per chunk, normalized after (now) | {in_memory:,.0f} |")
        print(f"\nin memory / per sample: {in_memory / per_sample:.1f}x")
        return 0

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
