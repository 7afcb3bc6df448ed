"""What a dist_train checkpoint costs against a plain torch.save/torch.load of the same state.

    python benchmarks/checkpoint_cost.py        # gpt_fsdp.yaml's GPT and GPT-2 small's shape
    python benchmarks/checkpoint_cost.py --reps 5 --out checkpoint_cost.json

One process, CPU. dist_train's save writes the model and AdamW state through DCP, the train
state and RNG, fsyncs every file, hashes them into the manifest and renames the directory;
its load verifies the manifest and reads through DCP. The plain baseline is one torch.save of
{model, optimizer} state dicts and one torch.load; it neither fsyncs nor verifies. The
training stall of a synchronous save is the save time; with checkpoint.async_save it is the
copy into host memory (async stall), while the write, hashing and manifest follow in the
background (async write: until the save is complete, measured by waiting for it at once).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_train import checkpoint
from dist_train.checkpoint.async_save import AsyncCheckpointer
from dist_train.distributed import DistEnv
from dist_train.gpt import GPT

MODELS = {
    "gpt_fsdp (4 x 128, 0.84M)": dict(n_layer=4, n_head=4, width=128, context=128),
    "gpt2_small shape (12 x 768, 85M)": dict(n_layer=12, n_head=12, width=768, context=1024),
}


def trained(shape: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = GPT(vocab_size=256, **shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randint(0, 256, (1, 8))).float().mean().backward()
    optimizer.step()  # creates the AdamW state
    return model, optimizer


def measure_once(root: Path, step: int, model, optimizer, env: DistEnv) -> dict[str, float]:
    plain = root / "plain.pt"
    marks = [time.perf_counter()]
    checkpoint.save(root, step, {"step": step}, model, optimizer, env, keep_last=1)
    marks.append(time.perf_counter())
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, plain)
    marks.append(time.perf_counter())
    checkpoint.load_model_and_optimizer(checkpoint.latest_valid(root), model, optimizer)
    marks.append(time.perf_counter())
    torch.load(plain, weights_only=True)
    marks.append(time.perf_counter())
    saver = AsyncCheckpointer(env, 1800.0, print)
    saver.save(root, step + 1000, {"step": step}, model, optimizer, keep_last=1)
    marks.append(time.perf_counter())
    saver.drain()
    saver.close()
    marks.append(time.perf_counter())
    names = ("save", "torch_save", "load", "torch_load", "async_stall", "async_write")
    return {name: marks[i + 1] - marks[i] for i, name in enumerate(names)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    rows = []
    header = ["model", "state MiB", "dist_train save", "async stall", "async write", "torch.save"]
    header += ["dist_train load", "torch.load"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for name, shape in MODELS.items():
        model, optimizer = trained(shape)
        slots = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        mib = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *slots]) / 2**20
        with tempfile.TemporaryDirectory() as tmp:
            runs = [measure_once(Path(tmp), rep + 1, model, optimizer, env) for rep in range(args.reps)]
        median = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        rows.append({"model": name, "state_mib": round(mib, 1), **{k: round(v, 3) for k, v in median.items()}})
        print(f"| {name} | {mib:.0f} | {median['save']:.3f} s | {median['async_stall']:.3f} s | "
              f"{median['async_write']:.3f} s | {median['torch_save']:.3f} s | "
              f"{median['load']:.3f} s | {median['torch_load']:.3f} s |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
