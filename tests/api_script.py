"""A user's own training script, the way the README shows it, for tests/test_api.py:

    torchrun --nproc-per-node 2 tests/api_script.py OUT_JSON TASK [key=value ...]
    python tests/api_script.py OUT_JSON TASK [key=value ...]

TASK: regression (train.loss=mse from the config), multilabel (bce_with_logits), or custom
(a Python loss function passed in). The model is built with a different seed on each rank,
as careless scripts do: fit must give every rank rank 0's weights.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import dist_train

FEATURES, OUTPUTS = 8, 3


def make_data(task: str, n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    w = torch.randn(FEATURES, OUTPUTS, generator=torch.Generator().manual_seed(99))
    y = x @ w + 0.1 * torch.randn(n, OUTPUTS, generator=g)
    return TensorDataset(x, (y > 0).float() if task == "multilabel" else y)


def huber(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.huber_loss(outputs, targets)


def main() -> None:
    run(sys.argv[1], sys.argv[2], sys.argv[3:])


def run(out: str, task: str, overrides: list[str]) -> None:
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(1000 + rank)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, OUTPUTS))
    config = {
        "run": {"name": task},
        "train": {"max_steps": 12, "log_every": 3, "eval_every": 6, "progress_bar": False},
        "optim": {"name": "adamw", "lr": 0.01},
        "schedule": {"name": "constant"},
        "checkpoint": {"every_steps": 6},
        "data": {"batch_size": 16},
    }
    config["train"]["loss"] = {"regression": "mse", "multilabel": "bce_with_logits"}.get(task, "cross_entropy")
    result = dist_train.fit(
        config,
        overrides,
        model=model,
        # 203 validation samples: not a multiple of 2 ranks, every one counted once
        train_data=make_data(task, 512, seed=1),
        val_data=make_data(task, 203, seed=2),
        loss=huber if task == "custom" else None,
    )
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"step": result.step, "eval": result.eval_metrics, "checkpoint": str(result.checkpoint)}, f)


if __name__ == "__main__":
    main()
