"""One benchmark worker: a workload written by hand, or with Lightning Fabric or Hugging Face
Accelerate. Run directly (1 process) or under torchrun (several); rank 0 prints one JSON line
with samples/s over the measured steps. benchmarks/overhead.py drives it.

    python benchmarks/loops.py --framework plain --precision bf16
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/loops.py --framework fabric
    python benchmarks/loops.py --workload gpt --batch-size 16
    python benchmarks/loops.py --workload resnet50 --image-size 224 --precision bf16 --channels-last   # a GPU

Workloads, each the same model and optimizer as the dist_train config overhead.py pairs it with:
- cnn: the seed CNN on CIFAR-shaped random tensors, SGD with momentum (configs/synthetic.yaml);
- resnet18, resnet50: torchvision's ResNets, same data and optimizer; the 32x32 stem for images
  up to 64 pixels, ImageNet's stem above (`--image-size 224`);
- gpt: the 4-layer GPT of configs/gpt_cpu.yaml on random byte sequences of 128 tokens, AdamW
  (weight decay on matrices only) and gradient clipping at 1.0.

On a GPU the hand-written loop is what an expert writes: model and inputs on the device
(channels_last with `--channels-last`; with `--uint8` images held as bytes and normalized on the
device, as dist_train's data.synthetic_dtype=uint8), pinned memory and non-blocking copies, bf16 autocast,
cuDNN's algorithm search, TF32 matmuls and a fused optimizer step, and a device synchronize
before each clock reading. Fabric and Accelerate run on the CPU only here.
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

from dist_train.config import ModelConfig
from dist_train.data import DataSpec
from dist_train.gpt import GPT
from dist_train.models import build_model  # the same modules the dist_train runs train

GPT_SHAPE = dict(vocab_size=256, context=128, n_layer=4, n_head=4, width=128, dropout=0.0)


def dataset(workload: str, size: int, image_size: int = 32, uint8: bool = False) -> TensorDataset:
    """Random inputs; with `uint8`, images as bytes (data.synthetic_dtype=uint8's path)."""
    g = torch.Generator().manual_seed(0)
    if workload == "gpt":
        tokens = torch.randint(0, GPT_SHAPE["vocab_size"], (size, GPT_SHAPE["context"] + 1), generator=g)
        return TensorDataset(tokens[:, :-1], tokens[:, 1:])
    shape = (size, 3, image_size, image_size)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if uint8 else torch.randn(*shape, generator=g)
    return TensorDataset(images, torch.randint(0, 10, (size,), generator=g))


def model_and_optimizer(
    workload: str, image_size: int = 32, device: torch.device = torch.device("cpu")
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    fused = {"fused": True} if device.type == "cuda" else {}
    if workload == "gpt":
        model = GPT(**GPT_SHAPE).to(device)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        return model, torch.optim.AdamW(groups, lr=0.002, betas=(0.9, 0.95), **fused)
    name = workload if workload.startswith("resnet") else "seed_cnn"
    config = ModelConfig(name=name, small_input_stem=image_size <= 64)
    model = build_model(config, DataSpec((3, image_size, image_size), 10)).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, **fused)


def loss_of(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Flattened so one line serves classes (batch, classes) and tokens (batch, seq, vocab).
    return F.cross_entropy(model(inputs).flatten(0, -2).float(), targets.flatten())


def loader(data: TensorDataset, batch: int, rank: int, world: int, pin_memory: bool = False) -> DataLoader:
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    return DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True, pin_memory=pin_memory)


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
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    model, optimizer = model_and_optimizer(args.workload, args.image_size, device)
    layout = torch.channels_last if args.channels_last else torch.preserve_format
    model = model.to(memory_format=layout)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    autocast = bf16 if args.precision == "bf16" else contextlib.nullcontext()
    data = dataset(args.workload, args.dataset_size, args.image_size, args.uint8)
    data_loader = loader(data, args.batch_size, rank, world, pin_memory=cuda)
    # uint8 images cross to the device as bytes and become normalized floats there.
    offset, scale = torch.tensor(0.5 * 255, device=device), torch.tensor(0.2887 * 255, device=device)
    start = None
    for step, (inputs, targets) in enumerate(batches(data_loader, args.warmup + args.steps)):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        inputs = inputs.to(
            device, non_blocking=True, memory_format=layout if inputs.ndim == 4 else torch.preserve_format
        )
        if inputs.dtype == torch.uint8:
            inputs = inputs.float().sub_(offset).div_(scale)
        targets = targets.to(device, non_blocking=True)
        with autocast:
            loss = loss_of(model, inputs, targets)
        loss.backward()
        if args.workload == "gpt":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
        loss = loss_of(model, inputs, targets)
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
    model, optimizer = fabric.setup(*model_and_optimizer(args.workload))
    data_loader = fabric.setup_dataloaders(
        loader(dataset(args.workload, args.dataset_size), args.batch_size, rank, world), use_distributed_sampler=False
    )
    return timed_steps(model, optimizer, data_loader, fabric.backward, args, world)


def run_accelerate(args, rank: int, world: int) -> float:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if args.precision == "bf16" else "no")
    model, optimizer = model_and_optimizer(args.workload)
    data_loader = loader(dataset(args.workload, args.dataset_size), args.batch_size, rank, world)
    model, optimizer = accelerator.prepare(model, optimizer)  # our loader is sharded already
    return timed_steps(model, optimizer, data_loader, accelerator.backward, args, world)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", choices=["plain", "fabric", "accelerate"], default="plain")
    parser.add_argument("--workload", choices=["cnn", "resnet18", "resnet50", "gpt"], default="cnn")
    parser.add_argument("--image-size", type=int, default=32, help="height and width of the random images")
    parser.add_argument("--channels-last", action="store_true", help="plain: model and inputs in NHWC")
    parser.add_argument("--uint8", action="store_true", help="plain: images held as bytes, normalized on the device")
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
