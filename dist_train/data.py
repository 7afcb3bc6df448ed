"""Datasets, augmentation and the sharded, resumable training data pipeline.

Two decisions make resume exact and independent of workers and world size:
- The data position is a *global* count of samples consumed from the epoch's permutation.
  Rank r reads remaining[r::world], so after any number of whole steps the ranks together
  have consumed exactly a prefix of the permutation.
- Augmentation randomness is a pure function of (seed, epoch, sample index): each sample
  seeds its own RNG, so neither DataLoader worker seeds nor the resume point change it.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset, default_collate

from dist_train.config import DataConfig, UserError
from dist_train.distributed import DistEnv, barrier


class DataError(UserError):
    pass


# Micro-batches an in-memory dataset gathers and augments at once. Each NumPy or torch call
# made between two training steps pays for caches the step has evicted (a 1 us NumPy call
# takes 17 us after the digits CNN's step); one call per 16 micro-batches pays it once.
IN_MEMORY_CHUNK = 16


@dataclass(frozen=True)
class DataSpec:
    input_shape: tuple[int, ...]  # (channels, height, width) for images, (seq_len,) for text
    num_classes: int


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    train_transform: Callable | None
    eval_transform: Callable | None
    spec: DataSpec
    # The validation loss of a trivial predictor, for scale (text: byte frequencies of train).
    baseline_val_loss: float | None = None


# --------------------------------------------------------------------------- registry

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pipeline(*, size: int, pad: int, flip: bool, mean: tuple, std: tuple, from_pil: bool, augment: bool):
    """(train, eval) torchvision v2 transforms: random crop with padding, optional flip, normalize."""
    from torchvision.transforms import v2

    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)] if from_pil else []
    normalize = [v2.Normalize(mean, std)]
    random_ops = [v2.RandomCrop(size, padding=pad)] + ([v2.RandomHorizontalFlip()] if flip else [])
    train = v2.Compose(to_tensor + (random_ops if augment else []) + normalize)
    return train, v2.Compose(to_tensor + normalize)


class RandomShift:
    """Translate images by up to `pad` pixels each way, filling with `fill`: what torchvision's
    RandomCrop(size, padding=pad, fill=fill) does, applied to a whole batch at once. The
    offsets are a hash of each sample's key, so a sample's shift does not depend on the batch
    it is in. Per sample through torchvision this cost about 150 us and was most of the digits
    job's step; a batch of 32 here costs about as much as one sample did."""

    def __init__(self, pad: int, fill: float) -> None:
        self.pad, self.fill = pad, fill

    def keyed(self, images: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        """images (batch, channels, height, width) on the CPU, one integer key per image."""
        # NumPy: a handful of small array operations cost less than the same ones through torch.
        batch, channels, height, width = images.shape
        mixed = _splitmix64(np.asarray(keys, dtype=np.uint64))
        span = np.uint64(2 * self.pad + 1)
        top, left = (mixed % span).astype(np.intp), ((mixed >> np.uint64(32)) % span).astype(np.intp)
        source = images.numpy()
        padded = np.full((batch, channels, height + 2 * self.pad, width + 2 * self.pad), self.fill, dtype=source.dtype)
        padded[:, :, self.pad : self.pad + height, self.pad : self.pad + width] = source
        # Every (top, left) window of every image as a view, (batch, channels, span, span, h, w).
        windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(2, 3))
        return torch.from_numpy(windows[np.arange(batch), :, top, left])


def _splitmix64(keys: np.ndarray) -> np.ndarray:
    """Well-mixed 64-bit values from integer keys (uint64 arithmetic wraps, as intended)."""
    with np.errstate(over="ignore"):
        x = keys + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _digits(cfg: DataConfig) -> Datasets:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    # A fixed split (seed 0), independent of run.seed, so validation numbers compare across runs.
    order = torch.tensor(np.random.RandomState(0).permutation(len(labels)))
    n_val = len(labels) // 5
    val_idx, train_idx = order[:n_val], order[n_val:]
    # The whole set fits in memory, so normalize it once instead of per sample; the random
    # shift then pads with the normalized value of a blank pixel.
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    # Digits are not mirror-symmetric, so no horizontal flip; a one-pixel shift is realistic.
    train_tf = RandomShift(1, fill=(-mean / std).item()) if cfg.augment else None
    return Datasets(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        train_transform=train_tf,
        eval_transform=None,
        spec=DataSpec((1, 8, 8), 10),
    )


def _torchvision_dataset(cfg: DataConfig, name: str) -> Datasets:
    from torchvision import datasets

    cls, shape, pad, flip, mean, std = {
        "cifar10": (datasets.CIFAR10, (3, 32, 32), 4, True, CIFAR10_MEAN, CIFAR10_STD),
        "mnist": (datasets.MNIST, (1, 28, 28), 2, False, MNIST_MEAN, MNIST_STD),
    }[name]
    try:
        train = cls(cfg.root, train=True, download=cfg.download)
        val = cls(cfg.root, train=False, download=cfg.download)
    except RuntimeError as exc:
        hint = "" if cfg.download else "; set data.download=true to fetch it"
        raise DataError(f"{name} not found under data.root={cfg.root} ({exc}){hint}") from None
    train_tf, eval_tf = _pipeline(
        size=shape[1], pad=pad, flip=flip, mean=mean, std=std, from_pil=True, augment=cfg.augment
    )
    return Datasets(train, val, train_tf, eval_tf, DataSpec(shape, 10))


def _image_folder(cfg: DataConfig) -> Datasets:
    from torchvision import datasets
    from torchvision.transforms import v2

    root = Path(cfg.root)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist (image_folder needs class-named folders of images)")
    try:
        train_full = datasets.ImageFolder(str(train_dir))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data.root={root} holds no usable images: {exc}") from None
    if (root / "val").is_dir():
        try:
            val = datasets.ImageFolder(str(root / "val"))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"{root}/val holds no usable images: {exc}") from None
        if val.classes != train_full.classes:
            raise DataError(f"{root}/val has classes {val.classes}, train has {train_full.classes}")
        train = train_full
    else:
        order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = max(1, int(len(order) * cfg.val_fraction))
        train, val = Subset(train_full, order[n_val:]), Subset(train_full, order[:n_val])
    size = cfg.image_size
    train_tf, eval_tf = _pipeline(
        size=size, pad=size // 8, flip=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, from_pil=True, augment=cfg.augment
    )
    # ImageFolder's loader already gives RGB; images come in any size, so make them square first.
    train_tf, eval_tf = v2.Compose([v2.Resize((size, size)), train_tf]), v2.Compose([v2.Resize((size, size)), eval_tf])
    return Datasets(train, val, train_tf, eval_tf, DataSpec((3, size, size), len(train_full.classes)))


def _synthetic(cfg: DataConfig) -> Datasets:
    # Fixed seed: every rank and every run sees the same tensors.
    g = torch.Generator().manual_seed(0)
    shape, n_val = tuple(cfg.synthetic_shape), max(1, cfg.synthetic_size // 8)

    def make(n: int) -> TensorDataset:
        return TensorDataset(
            torch.randn(n, *shape, generator=g), torch.randint(0, cfg.synthetic_classes, (n,), generator=g)
        )

    return Datasets(make(cfg.synthetic_size), make(n_val), None, None, DataSpec(shape, cfg.synthetic_classes))


class TokenSequences(Dataset):
    """Non-overlapping windows of seq_len + 1 byte tokens: (input, next-token targets)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[index * self.seq_len : (index + 1) * self.seq_len + 1].long()
        return window[:-1], window[1:]


def stdlib_sources() -> list[Path]:
    """The running Python's own standard-library sources: real text present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def _read_tokens(files: list[Path]) -> torch.Tensor:
    # Bytes are the tokens (vocabulary 256); a NUL byte marks where one file ends.
    data = b"\0".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _text(cfg: DataConfig) -> Datasets:
    if cfg.paths:
        matches = {Path(p) for pattern in cfg.paths for p in glob.glob(os.path.expanduser(pattern), recursive=True)}
        files = sorted(p for p in matches if p.is_file())
        if not files:
            raise DataError(f"data.paths={cfg.paths} matched no files")
    else:
        files = stdlib_sources()
    if len(files) < 2:
        raise DataError(f"data.dataset=text splits by file and needs at least 2 files, got {len(files)}")
    # Split by file with a fixed seed, so validation text never leaks into training windows.
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = max(1, round(len(files) * cfg.val_fraction))
    val_files = sorted(files[i] for i in order[:n_val])
    train_files = sorted(files[i] for i in order[n_val:])
    train, val = (
        TokenSequences(_read_tokens(train_files), cfg.seq_len),
        TokenSequences(_read_tokens(val_files), cfg.seq_len),
    )
    if len(val) == 0:
        raise DataError(f"the validation files hold fewer than data.seq_len={cfg.seq_len} + 1 bytes")
    baseline = unigram_loss(train.tokens, val.tokens)
    return Datasets(train, val, None, None, DataSpec((cfg.seq_len,), 256), baseline)


def unigram_loss(train_tokens: torch.Tensor, val_tokens: torch.Tensor) -> float:
    """Cross-entropy (nats per token) on validation of predicting every byte by its training
    frequency (add-one smoothed): what a model that ignores context achieves."""
    counts = torch.bincount(train_tokens.long(), minlength=256).double() + 1
    log_p = (counts / counts.sum()).log()
    return -log_p[val_tokens.long()].mean().item()


def build_datasets(cfg: DataConfig) -> Datasets:
    if cfg.dataset == "digits":
        return _digits(cfg)
    if cfg.dataset in ("cifar10", "mnist"):
        return _torchvision_dataset(cfg, cfg.dataset)
    if cfg.dataset == "image_folder":
        return _image_folder(cfg)
    if cfg.dataset == "synthetic":
        return _synthetic(cfg)
    if cfg.dataset == "text":
        return _text(cfg)
    raise DataError(f"unknown data.dataset {cfg.dataset!r}")


# --------------------------------------------------------------------------- sampling


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that starts mid-epoch and yields only whole global batches.

    `shard()` is this rank's share of the epoch's order, which the training loader reads in
    chunks (ChunkSampler); iterating yields the same as (epoch, index) pairs, one per sample.
    The epoch is cut to a multiple of the global batch: every optimizer step sees a full
    batch and no rank ever has more batches than another.
    """

    def __init__(
        self, dataset_len: int, world_size: int, rank: int, seed: int, global_batch: int, shuffle: bool = True
    ) -> None:
        super().__init__(
            range(dataset_len), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.dataset_len = dataset_len
        self.global_batch = global_batch
        self.samples_per_epoch = (dataset_len // global_batch) * global_batch  # global, all ranks
        self.start = 0  # samples of this epoch already consumed by all ranks together

    def set_start(self, consumed: int) -> None:
        if consumed % self.num_replicas or not 0 <= consumed <= self.samples_per_epoch:
            raise ValueError(f"cannot start at sample {consumed} of an epoch of {self.samples_per_epoch}")
        self.start = consumed

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        return torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + epoch))

    def shard(self) -> np.ndarray:
        """This rank's indices for the rest of the epoch."""
        return self.permutation(self.epoch)[self.start : self.samples_per_epoch][self.rank :: self.num_replicas].numpy()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in self.shard().tolist()])

    def __len__(self) -> int:
        return (self.samples_per_epoch - self.start) // self.num_replicas


@dataclass(frozen=True)
class SampleKeys:
    """What the loader fetches at once: dataset indices and their epoch (part of each sample's
    augmentation key). A NumPy array, not per-sample pairs, so that an in-memory dataset
    gathers them in one indexing operation."""

    epoch: int
    indices: np.ndarray


class ChunkSampler(torch.utils.data.Sampler[SampleKeys]):
    """The DataLoader's batch sampler: the sampler's shard cut into chunks of whole
    micro-batches, which TrainBatches splits again. A shard is always a whole number of
    micro-batches: the epoch is cut to whole global batches and resumes only between them."""

    def __init__(self, sampler: ResumableDistributedSampler, batch_size: int, micro_batches_per_chunk: int) -> None:
        self.sampler, self.chunk_size = sampler, batch_size * micro_batches_per_chunk

    def __iter__(self) -> Iterator[SampleKeys]:
        shard, epoch, size = self.sampler.shard(), self.sampler.epoch, self.chunk_size
        return (SampleKeys(epoch, shard[start : start + size]) for start in range(0, len(shard), size))

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.chunk_size)


class SeededAugment(Dataset):
    """The training set as the loader reads it: a chunk of samples at a time (`__getitems__`
    with SampleKeys), the training transform's randomness a function of (seed, epoch, index).

    An in-memory TensorDataset is gathered with one indexing operation per tensor, and a
    transform with a `keyed(images, keys)` method (RandomShift) augments the whole batch.
    Anything else goes sample by sample; a torchvision transform then runs with the global
    generator seeded from the sample's key.
    """

    def __init__(self, base: Dataset, transform: Callable | None, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed
        self.in_memory = isinstance(base, TensorDataset) and (transform is None or hasattr(transform, "keyed"))

    def __len__(self) -> int:
        return len(self.base)

    def keys(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        """Each sample's augmentation key, a non-negative int63 (uint64 arithmetic cannot
        overflow: the first term is below 2**63 and an index below 2**63)."""
        first = (self.seed * 1_000_003 + epoch) * 10_000_019 % 2**63
        return (np.uint64(first) + indices.astype(np.uint64)) % np.uint64(2**63)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any]:
        epoch, index = key
        x, y = self.base[index]
        if self.transform is None:
            return x, y
        if hasattr(self.transform, "keyed"):
            return self.transform.keyed(x.unsqueeze(0), self.keys(epoch, np.array([index])))[0], y
        # torchvision transforms draw from the global CPU generator: seed it for this sample and
        # put the caller's state back (torch.random.fork_rng costs 100x more per sample).
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(int(self.keys(epoch, np.array([index]))[0]))
        try:
            return self.transform(x), y
        finally:
            generator.set_state(saved)

    def __getitems__(self, samples: SampleKeys) -> Any:
        if not self.in_memory:
            return [self[(samples.epoch, index)] for index in samples.indices.tolist()]
        rows = torch.from_numpy(samples.indices)
        images, labels = (tensor[rows] for tensor in self.base.tensors)
        if self.transform is not None:
            images = self.transform.keyed(images, self.keys(samples.epoch, samples.indices))
        return Collated((images, labels))


class Collated(tuple):
    """A batch that is already stacked: `collate` passes it through."""


def collate(samples: Any) -> Any:
    return samples if isinstance(samples, Collated) else default_collate(samples)


class Transformed(Dataset):
    def __init__(self, base: Dataset, transform: Callable | None) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.base[index]
        return (self.transform(x) if self.transform else x), y


class TrainBatches:
    """Micro-batches across epochs, with a checkpointable position (epoch, samples consumed).

    The loader yields chunks of one or more micro-batches (see IN_MEMORY_CHUNK); they are split
    here into views, so the position still moves one micro-batch at a time.
    """

    def __init__(self, loader: DataLoader, sampler: ResumableDistributedSampler, batch_size: int) -> None:
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.epoch, self.consumed = 0, 0
        self._iterator: Iterator | None = None
        self._ready: list = []  # micro-batches of the current chunk, last one first
        self._samples_per_micro_batch = batch_size * sampler.num_replicas

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.samples_per_epoch // self.sampler.global_batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples_consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["samples_consumed"])
        self._iterator, self._ready = None, []

    def next_micro_batch(self) -> Any:
        if not self._ready:
            if self._iterator is None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.consumed)
                self._iterator = iter(self.loader)
            chunk = next(self._iterator)
            self._ready = list(zip(*(part.split(self.batch_size) for part in chunk), strict=True))[::-1]
        batch = self._ready.pop()
        self.consumed += self._samples_per_micro_batch
        if self.consumed >= self.sampler.samples_per_epoch:
            self.epoch, self.consumed, self._iterator, self._ready = self.epoch + 1, 0, None, []
        return batch


class EvalShard(torch.utils.data.Sampler[int]):
    """Rank r evaluates samples r, r+world, ...: every sample once, none padded or repeated."""

    def __init__(self, dataset_len: int, world_size: int, rank: int) -> None:
        self.indices = list(range(rank, dataset_len, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class DataPipeline:
    train: TrainBatches
    val_loader: DataLoader
    spec: DataSpec
    global_batch: int
    baseline_val_loss: float | None


def build_pipeline(cfg: DataConfig, env: DistEnv, grad_accum_steps: int, seed: int) -> DataPipeline:
    # One process per node downloads; the others wait for it and then read the files.
    downloading = cfg.download and env.is_distributed
    if downloading and env.local_rank != 0:
        barrier()
    datasets = build_datasets(cfg)
    if downloading and env.local_rank == 0:
        barrier()
    global_batch = env.world_size * cfg.batch_size * grad_accum_steps
    n_train = len(datasets.train)
    if n_train < global_batch:
        raise DataError(
            f"data.dataset={cfg.dataset} has {n_train} training samples, fewer than one global batch of "
            f"{global_batch} (world {env.world_size} x data.batch_size {cfg.batch_size} x "
            f"train.grad_accum_steps {grad_accum_steps})"
        )
    sampler = ResumableDistributedSampler(n_train, env.world_size, env.rank, seed, global_batch)
    loader_kwargs: dict[str, Any] = dict(
        num_workers=cfg.num_workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        # Our own generator keeps DataLoader from drawing on the global RNG, which would
        # shift dropout and init randomness whenever an iterator is (re)created.
        generator=torch.Generator().manual_seed(seed),
    )
    train_set = SeededAugment(datasets.train, datasets.train_transform, seed)
    train_loader = DataLoader(
        train_set,
        batch_sampler=ChunkSampler(sampler, cfg.batch_size, IN_MEMORY_CHUNK if train_set.in_memory else 1),
        collate_fn=collate,
        **loader_kwargs,
    )
    val = Transformed(datasets.val, datasets.eval_transform)
    val_loader = DataLoader(
        val, batch_size=cfg.eval_batch_size, sampler=EvalShard(len(val), env.world_size, env.rank), **loader_kwargs
    )
    return DataPipeline(
        TrainBatches(train_loader, sampler, cfg.batch_size),
        val_loader,
        datasets.spec,
        global_batch,
        datasets.baseline_val_loss,
    )


def total_steps(max_steps: int | None, max_epochs: int | None, steps_per_epoch: int) -> int:
    """Total optimizer steps: whichever of max_steps and max_epochs ends first (one must be set)."""
    limits = [s for s in (max_steps, None if max_epochs is None else max_epochs * steps_per_epoch) if s is not None]
    return min(limits)
