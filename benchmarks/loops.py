"""One benchmark worker: the seed-CNN workload written by hand, or with Lightning Fabric or
Hugging Face Accelerate. Run directly (1 process) or under torchrun (several); rank 0 prints
one JSON line with samples/s over the measured steps. benchmarks/overhead.py drives it.

    python benchmarks/loops.py --framework plain --precision bf16
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/loops.py --framework fabric
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dist_train.models import SeedCNN  # the same module the dist_train run trains


def dataset(size: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))


def loader(data: TensorDataset, batch: int, rank: int, world: int) -> DataLoader:
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    return DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True)


def batches(data_loader: DataLoader, steps: int):
    """`steps` batches, across epochs as needed."""
    epoch = 0
    while True:
        data_loader.sampler.set_epoch(epoch)
        for batch in data_loader:
            yield batch
            steps -= 1
            if steps == 0:
                return
        epoch += 1


def run_plain(args, rank: int, world: int) -> float:
    if world > 1:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    model = SeedCNN(3, 32, 10)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    data_loader = loader(dataset(args.dataset_size), args.batch_size, rank, world)
    start = None
    for step, (inputs, targets) in enumerate(batches(data_loader, args.warmup + args.steps)):
        if step == args.warmup:
            start = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(inputs).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    elapsed = time.perf_counter() - start
    if world > 1:
        torch.distributed.destroy_process_group()
    return args.steps * args.batch_size * world / elapsed


def timed_steps(model, optimizer, data_loader: DataLoader, backward, args, world: int) -> float:
    """The frameworks' loop: the hand-written one with their backward (which also casts)."""
    start = None
    for step, (inputs, targets) in enumerate(batches(data_loader, args.warmup + args.steps)):
        if step == args.warmup:
            start = time.perf_counter()
        loss = F.cross_entropy(model(inputs).float(), targets)
        backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    return args.steps * args.batch_size * world / (time.perf_counter() - start)


def run_fabric(args, rank: int, world: int) -> float:
    try:
        from lightning.fabric import Fabric
    except ImportError:  # the standalone package
        from lightning_fabric import Fabric

    precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    fabric = Fabric(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", precision=precision)
    fabric.launch()
    torch.manual_seed(0)
    model = SeedCNN(3, 32, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    data_loader = fabric.setup_dataloaders(
        loader(dataset(args.dataset_size), args.batch_size, rank, world), use_distributed_sampler=False
    )
    return timed_steps(model, optimizer, data_loader, fabric.backward, args, world)


def run_accelerate(args, rank: int, world: int) -> float:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if args.precision == "bf16" else "no")
    torch.manual_seed(0)
    model = SeedCNN(3, 32, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data_loader = loader(dataset(args.dataset_size), args.batch_size, rank, world)
    model, optimizer = accelerator.prepare(model, optimizer)  # our loader is sharded already
    return timed_steps(model, optimizer, data_loader, accelerator.backward, args, world)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", choices=["plain", "fabric", "accelerate"], default="plain")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dataset-size", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    runner = {"plain": run_plain, "fabric": run_fabric, "accelerate": run_accelerate}[args.framework]
    samples_per_s = runner(args, rank, world)
    if rank == 0:
        print(json.dumps({"samples_per_s": samples_per_s}), flush=True)


if __name__ == "__main__":
    main()
