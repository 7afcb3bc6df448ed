"""Run under torchrun: load a checkpoint into a fresh FSDP GPT on this world size, gather the
loaded model and optimizer state whole, and have rank 0 save it for the test to compare.

    python -m torch.distributed.run --nproc-per-node M tests/reload_worker.py CHECKPOINT OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from dist_train import checkpoint
from dist_train.config import OptimConfig, ParallelConfig
from dist_train.distributed import process_group
from dist_train.gpt import GPT
from dist_train.optim import build_optimizer
from dist_train.parallel import build_strategy


def main(source: Path, out: Path) -> None:
    with process_group() as env:
        torch.manual_seed(1234)  # weights unlike the saved ones, so a load that does nothing fails
        model = build_strategy(ParallelConfig(strategy="fsdp"), env).wrap(
            GPT(vocab_size=256, context=32, n_layer=2, n_head=2, width=32)
        )
        optimizer = build_optimizer(OptimConfig(name="adamw", lr=0.003), model)
        checkpoint.load_model_and_optimizer(source, model, optimizer)
        model_state, optim_state = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if env.is_main:  # full state dicts offloaded to the CPU exist on rank 0 only
            slots = optim_state["state"].items()
            flat_optim = {f"state.{name}.{key}": value for name, state in slots for key, value in state.items()}
            torch.save({"model": model_state, "optim": flat_optim}, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
