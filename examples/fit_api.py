"""Train from your own script: the model and the data built in Python, one call to dist_train.

    python examples/fit_api.py [key=value ...]                            # one process
    torchrun --nproc-per-node 2 examples/fit_api.py parallel.strategy=ddp  # two, the same code

The config file gives everything else (optimizer, schedule, checkpoints, logging); the objects
passed to fit win over the model and dataset it names. Run it again after a stop and it resumes.
"""

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import dist_train


def digits() -> tuple[TensorDataset, TensorDataset]:
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    val, train = order[:360], order[360:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def main() -> None:
    train_set, val_set = digits()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
    result = dist_train.fit(
        "configs/digits.yaml",
        ["run.name=fit_api", "logging.wandb.mode=disabled", "train.metrics=[accuracy]", *sys.argv[1:]],
        model=model,
        train_data=train_set,
        val_data=val_set,
        loss=nn.CrossEntropyLoss(label_smoothing=0.05),  # any (outputs, targets) -> mean callable
    )
    print(f"step {result.step}: {result.eval_metrics}")


if __name__ == "__main__":
    main()
