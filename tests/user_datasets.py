"""Dataset factories given to dist_train as `tests.user_datasets:factory` (data.dataset), the way
users plug in their own: `factory(cfg, **data.kwargs)` returns {"train", "val", ...}."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from dist_train.config import DataConfig


class Blobs(Dataset):
    """Images of one bright square whose place gives the class, made from the index alone:
    loaded sample by sample, as a dataset of files would be (not the in-memory fast path)."""

    def __init__(self, n: int, size: int, offset: int) -> None:
        self.n, self.size, self.offset = n, size, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.offset + index)
        label = int(torch.randint(0, 4, (1,), generator=g))
        image = 0.3 * torch.randn(1, self.size, self.size, generator=g)
        half = self.size // 2
        top, left = divmod(label, 2)
        image[:, top * half : (top + 1) * half, left * half : (left + 1) * half] += 1.0
        return image, label


def noisy_flip(x: torch.Tensor) -> torch.Tensor:
    """A random training transform drawing from torch's global generator, as torchvision's do."""
    x = x + 0.05 * torch.randn_like(x)
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def blobs(cfg: DataConfig, n_train: int = 96, n_val: int = 20, size: int = 8) -> dict[str, Any]:
    return {
        "train": Blobs(n_train, size, offset=0),
        "val": Blobs(n_val, size, offset=10_000),
        "num_classes": 4,
        "train_transform": noisy_flip,
    }


def tensors(cfg: DataConfig, n_val: int = 8) -> dict[str, Any]:
    """Returns no num_classes or input_shape: they come from data.* or are read from the data."""
    g = torch.Generator().manual_seed(0)
    return {
        "train": TensorDataset(torch.randn(64, 1, 4, 4, generator=g), torch.randint(0, 3, (64,), generator=g)),
        "val": TensorDataset(torch.randn(n_val, 1, 4, 4, generator=g), torch.randint(0, 3, (n_val,), generator=g)),
    }


def needs_size(cfg: DataConfig, size: int) -> dict[str, Any]:
    return blobs(cfg, size=size)


def missing_file(cfg: DataConfig) -> dict[str, Any]:
    with open(f"{cfg.root}/labels.csv") as f:  # raises FileNotFoundError: an error inside the factory
        f.read()
    return {}


def a_pair(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    parts = blobs(cfg)
    return parts["train"], parts["val"]


class Stream(IterableDataset):
    def __iter__(self):
        yield from Blobs(16, 8, 0)


def stream(cfg: DataConfig) -> dict[str, Any]:
    return {"train": Stream(), "val": Blobs(8, 8, 0), "num_classes": 4}
