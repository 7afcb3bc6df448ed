"""Your own dataset, plugged in by name: `data.dataset: examples.my_dataset:shapes`.

    dist-train train examples/my_dataset.yaml                        # one process
    dist-train launch examples/my_dataset.yaml --nproc-per-node 2   # two, the same data

The contract (README, "Your own dataset"): dist_train calls the factory on every rank as
`shapes(cfg, **data.kwargs)`, where `cfg` is the run's DataConfig (data.root, data.seq_len, ...),
and it returns a dict:

    "train", "val"      map-style datasets: __len__, and __getitem__(i) -> (input, target)
    "num_classes"       optional: what the model is built for (data.num_classes wins)
    "input_shape"       optional: one input's shape (data.input_shape wins); else measured
    "train_transform"   optional: applied by dist_train to each training input, its randomness
                        seeded per (run.seed, epoch, sample), so a resumed run sees exactly the
                        augmentation it would have seen, whatever data.num_workers
    "eval_transform"    optional: applied to each validation input

dist_train then shards, shuffles, resumes mid-epoch, loads with data.num_workers worker processes
and, with data.skip_bad_samples, replaces samples that cannot be read, as for its own datasets.

The data here are small grayscale images of three shapes, one PNG file each, listed with their
labels in a labels.csv per split: files read one by one, as most real datasets are. So that the
example runs anywhere without a download, the factory draws them under data.root the first time.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision.transforms import v2

from dist_train.config import DataConfig

CLASSES = ["circle", "square", "triangle"]


class LabeledImages(Dataset):
    """Images listed in `folder/labels.csv` (rows of `file,label`), each read when asked for."""

    def __init__(self, folder: Path, classes: list[str]) -> None:
        with open(folder / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        self.classes = classes
        # (path, class index) pairs, as torchvision's ImageFolder keeps them: dist_train then
        # names the file of a sample that cannot be read.
        self.samples = [(folder / row["file"], classes.index(row["label"])) for row in rows]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).unsqueeze(0), label  # (1, height, width) in [0, 1]


def shapes(cfg: DataConfig, size: int = 16, per_class: int = 200) -> dict[str, Any]:
    """The factory data.dataset names; `size` and `per_class` come from data.kwargs."""
    root = Path(cfg.root) / f"shapes_{size}px_{per_class}"
    if not (root / "val" / "labels.csv").is_file():
        draw_shapes(root, size, per_class)
    normalize = v2.Normalize([0.5], [0.5])
    return {
        "train": LabeledImages(root / "train", CLASSES),
        "val": LabeledImages(root / "val", CLASSES),
        "num_classes": len(CLASSES),
        "input_shape": [1, size, size],
        # Shapes stay shapes when mirrored, turned a little or moved by a pixel or two.
        "train_transform": v2.Compose(
            [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10, translate=(0.1, 0.1)), normalize]
        ),
        "eval_transform": normalize,
    }


def draw_shapes(root: Path, size: int, per_class: int) -> None:
    """`per_class` images of each shape (a fifth of them for validation), of random place,
    size and shade on a noisy background, with a labels.csv per split. The same files every
    time (seed 0); written aside and renamed into place, so that ranks drawing them at once
    never read a half-written folder."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=root.parent))  # same filesystem
    rng = np.random.default_rng(0)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for label in CLASSES:
        for i in range(per_class):
            split = "val" if i % 5 == 0 else "train"
            background = rng.normal(60, 20, (size, size)).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(background, mode="L")
            radius = rng.uniform(0.25, 0.4) * size
            cx, cy = rng.uniform(radius, size - radius, 2)
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            shade = int(rng.integers(150, 256))
            draw = ImageDraw.Draw(image)
            if label == "circle":
                draw.ellipse(box, fill=shade)
            elif label == "square":
                draw.rectangle(box, fill=shade)
            else:
                draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=shade)
            name = f"{label}_{i:04d}.png"
            (staging / split).mkdir(exist_ok=True)
            image.save(staging / split / name)
            rows[split].append((name, label))
    for split, entries in rows.items():
        with open(staging / split / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label"])
            writer.writerows(entries)
    try:
        staging.rename(root)
    except OSError:  # another rank renamed its (identical) copy first
        shutil.rmtree(staging)
