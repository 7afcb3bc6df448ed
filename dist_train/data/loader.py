"""From datasets to batches: keyed augmentation in chunks, the checkpointable stream of
training micro-batches, and the pipeline the trainer gets (build_pipeline)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from dist_train.config import DataConfig
from dist_train.data.datasets import DOWNLOADABLE, DataError, Datasets, DataSpec, build_datasets
from dist_train.data.sampler import ChunkSampler, EvalShard, ResumableDistributedSampler, SampleKeys
from dist_train.distributed import DistEnv, all_gather_objects

# Micro-batches an in-memory dataset gathers and augments at once. Each NumPy or torch call
# made between two training steps pays for caches the step has evicted (a 1 us NumPy call
# takes 17 us after the digits CNN's step); one call per 16 micro-batches pays it once.
IN_MEMORY_CHUNK = 16


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


@dataclass
class DataPipeline:
    train: TrainBatches
    val_loader: DataLoader
    spec: DataSpec
    global_batch: int
    baseline_val_loss: float | None
    device: torch.device = torch.device("cpu")
    # Images kept as uint8 are normalized on the device: (x - 255 mean) / (255 std) per channel.
    pixel_offset: torch.Tensor | None = None
    pixel_scale: torch.Tensor | None = None

    def inputs_to_device(
        self, inputs: torch.Tensor, memory_format: torch.memory_format = torch.preserve_format
    ) -> torch.Tensor:
        """A batch of inputs on the device in the form the model takes: uint8 images cross as
        bytes (a quarter of float32's traffic) and become normalized floats there."""
        inputs = inputs.to(self.device, non_blocking=True, memory_format=memory_format)
        if self.pixel_offset is None:
            return inputs
        return inputs.float().sub_(self.pixel_offset).div_(self.pixel_scale)


def uint8_normalization(
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """DataPipeline's (pixel_offset, pixel_scale) for images held as uint8 with these (mean,
    std) of [0, 1] pixels: 255 mean and 255 std per channel; (None, None) for the rest."""
    if normalize is None:
        return None, None
    offset, scale = (torch.tensor(v, device=device).mul(255).view(1, -1, 1, 1) for v in normalize)
    return offset, scale


def load_datasets(cfg: DataConfig, env: DistEnv) -> Datasets:
    """The datasets, downloaded at most once per shared `data.root`.

    Global rank 0 downloads first while every other rank waits; then the first rank of each
    other node downloads only what its node does not see (a node-local root), while its node
    waits. A shared root is thus fetched once, a node-local one once per node. A failure
    anywhere reaches every rank as one line, so none is left waiting in a collective.
    """
    if not (cfg.download and cfg.dataset in DOWNLOADABLE and env.is_distributed):
        return build_datasets(cfg)
    turns = ((env.rank == 0, "global rank 0"), (env.rank != 0 and env.local_rank == 0, "its node's first rank"))
    datasets = None
    for mine, who in turns:
        failure = None
        if mine:
            try:
                datasets = build_datasets(cfg, download=True)  # finds files already there and skips
            except Exception as exc:  # noqa: BLE001 - reported on every rank below, so none waits forever
                failure = f"rank {env.rank} ({who}) could not get the data: {exc}"
        failures = [f for f in all_gather_objects(failure) if f is not None]  # everyone waits here
        if failures:
            raise DataError(failures[0])
    return datasets if datasets is not None else build_datasets(cfg, download=False)


def build_pipeline(
    cfg: DataConfig, env: DistEnv, grad_accum_steps: int, seed: int, datasets: Datasets | None = None
) -> DataPipeline:
    """The run's batches from the datasets `cfg` names, or from `datasets` when given."""
    datasets = datasets if datasets is not None else load_datasets(cfg, env)
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
        env.device,
        *uint8_normalization(datasets.normalize, env.device),
    )


def total_steps(max_steps: int | None, max_epochs: int | None, steps_per_epoch: int) -> int:
    """Total optimizer steps: whichever of max_steps and max_epochs ends first (one must be set)."""
    limits = [s for s in (max_steps, None if max_epochs is None else max_epochs * steps_per_epoch) if s is not None]
    return min(limits)
