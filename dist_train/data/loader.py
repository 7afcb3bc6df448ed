"""From datasets to batches: keyed augmentation in chunks, the checkpointable stream of
training micro-batches, and the pipeline the trainer gets (build_pipeline)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from dist_train.config import DataConfig
from dist_train.data.batch import Batch
from dist_train.data.datasets import DOWNLOADABLE, DataError, Datasets, DataSpec, build_datasets, one_line
from dist_train.data.sampler import ChunkSampler, EvalShard, ResumableDistributedSampler, SampleKeys
from dist_train.distributed import DistEnv, all_gather_objects, all_reduce_sum

# Micro-batches an in-memory dataset gathers and augments at once. Each NumPy or torch call
# made between two training steps pays for caches the step has evicted (a 1 us NumPy call
# takes 17 us after the digits CNN's step); one call per 16 micro-batches pays it once.
IN_MEMORY_CHUNK = 16


# data.skip_bad_samples: a sample that fails to load is replaced by up to this many others in
# turn; when all of them fail too, most of the data is unreadable and the run stops.
MAX_REPLACEMENTS = 10


@dataclass(frozen=True)
class LoadFailure:
    """What the loader yields in place of a batch with a sample that could not be loaded (and
    was not replaced): the one line to report. A DataLoader worker returns it rather than
    raising, because DataLoader re-raises a worker's exception with the worker's traceback in
    its message; the main process raises it (TrainBatches, EvalBatches) as a DataError."""

    message: str


@dataclass
class Fetched:
    """Samples loaded one by one for a batch, and how many of them replace unreadable ones."""

    samples: list
    replaced: int


class _Unreadable(Exception):
    """A sample (and its replacements) could not be loaded; caught in the same process."""


def sample_file(dataset: Dataset, index: int) -> str | None:
    """The file sample `index` is read from, where the dataset lists its files the way
    torchvision's ImageFolder does (`samples`: (path, class) pairs), also through Subsets."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None)
    if not isinstance(samples, (list, tuple)) or not 0 <= index < len(samples):
        return None
    entry = samples[index]
    path = entry[0] if isinstance(entry, (tuple, list)) and entry else entry
    return str(path) if isinstance(path, (str, os.PathLike)) else None


def replacement(key: int, attempt: int, n: int) -> int:
    """The dataset index that stands in for an unreadable sample: a hash of the sample's key
    (seed, epoch and index for training; the index for validation) and the attempt, so every
    run, worker count and resume point picks the same one."""
    x = (key + (attempt + 1) * 0x9E3779B97F4A7C15) % 2**64  # splitmix64
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB % 2**64
    return (x ^ (x >> 31)) % n


_reported: set[tuple[str, int]] = set()  # (role, index) already warned about in this process


def load_or_replace(
    load: Callable[[int], Any], index: int, key: Callable[[], int], base: Dataset, role: str, skip: bool
) -> tuple[Any, bool]:
    """`load(index)`, and whether it had to be replaced. A sample that raises (corrupt file,
    decode error) is one line naming its index and file, or with `skip` the first readable
    of its replacements (see `replacement`; `key()` gives the sample's key, computed only then)."""
    try:
        return load(index), False
    except Exception as exc:  # noqa: BLE001 - whatever user code or a decoder raises
        what = f"{role} sample {index}"
        path = sample_file(base, index)
        what += f" ({path})" if path else ""
        what += f" could not be loaded: {type(exc).__name__}: {one_line(exc)}"
    if not skip:
        raise _Unreadable(f"{what}; data.skip_bad_samples=true replaces unreadable samples")
    for attempt in range(MAX_REPLACEMENTS):
        other = replacement(key(), attempt, len(base))
        try:
            sample = load(other)
        except Exception:  # noqa: BLE001 - another unreadable one: try the next
            continue
        if (role, index) not in _reported:  # once per process, not once per epoch
            _reported.add((role, index))
            print(f"warning: {what}; replaced by sample {other} (data.skip_bad_samples)", file=sys.stderr, flush=True)
        return sample, True
    raise _Unreadable(f"{what}, and so could its {MAX_REPLACEMENTS} replacements: is most of the data unreadable?")


class SeededAugment(Dataset):
    """The training set as the loader reads it: a chunk of samples at a time (`__getitems__`
    with SampleKeys), the training transform's randomness a function of (seed, epoch, index).

    An in-memory TensorDataset is gathered with one indexing operation per tensor, and a
    transform with a `keyed(images, keys)` method (RandomShift) augments the whole batch.
    Anything else goes sample by sample; a torchvision transform then runs with the global
    generator seeded from the sample's key.
    """

    def __init__(self, base: Dataset, transform: Callable | None, seed: int, skip_bad_samples: bool = False) -> None:
        self.base, self.transform, self.seed, self.skip_bad_samples = base, transform, seed, skip_bad_samples
        # Indexing tensors cannot meet an unreadable sample: in-memory chunks never replace one.
        self.in_memory = isinstance(base, TensorDataset) and (transform is None or hasattr(transform, "keyed"))

    def __len__(self) -> int:
        return len(self.base)

    def keys(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        """Each sample's augmentation key, a non-negative int63 (uint64 arithmetic cannot
        overflow: the first term is below 2**63 and an index below 2**63)."""
        first = (self.seed * 1_000_003 + epoch) * 10_000_019 % 2**63
        return (np.uint64(first) + indices.astype(np.uint64)) % np.uint64(2**63)

    def _key(self, epoch: int, index: int) -> int:
        return int(self.keys(epoch, np.array([index]))[0])

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any]:
        epoch, index = key
        return self._sample(epoch, index, index)

    def _sample(self, epoch: int, index: int, key_index: int) -> tuple[Any, Any]:
        """Sample `index`, augmented with the key of position `key_index` (the same index, or
        the unreadable sample it replaces: a replacement is not a copy of its own augmentation)."""
        x, y = self.base[index]
        if self.transform is None:
            return x, y
        if hasattr(self.transform, "keyed"):
            return self.transform.keyed(x.unsqueeze(0), self.keys(epoch, np.array([key_index])))[0], y
        # torchvision transforms draw from the global CPU generator: seed it for this sample and
        # put the caller's state back (torch.random.fork_rng costs 100x more per sample).
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(int(self.keys(epoch, np.array([key_index]))[0]))
        try:
            return self.transform(x), y
        finally:
            generator.set_state(saved)

    def __getitems__(self, samples: SampleKeys) -> Any:
        if not self.in_memory:
            epoch, loaded = samples.epoch, []
            try:
                for index in samples.indices.tolist():
                    load = functools.partial(self._sample, epoch, key_index=index)
                    key = functools.partial(self._key, epoch, index)
                    loaded.append(load_or_replace(load, index, key, self.base, "training", self.skip_bad_samples))
            except _Unreadable as exc:
                return LoadFailure(str(exc))
            return Fetched([sample for sample, _ in loaded], sum(replaced for _, replaced in loaded))
        rows = torch.from_numpy(samples.indices)
        images, labels = (tensor[rows] for tensor in self.base.tensors)
        if self.transform is not None:
            images = self.transform.keyed(images, self.keys(samples.epoch, samples.indices))
        return Collated((images, labels, 0))


class Collated(tuple):
    """A batch that is already stacked: `collate` passes it through."""


def collate(fetched: Any) -> Any:
    """Training batches: (inputs, targets, samples replaced), or a LoadFailure."""
    if isinstance(fetched, (Collated, LoadFailure)):
        return fetched
    inputs, targets = default_collate(fetched.samples)
    return Collated((inputs, targets, fetched.replaced))


def collate_eval(fetched: Fetched | LoadFailure) -> Any:
    """Validation batches: (inputs, targets), or a LoadFailure."""
    return fetched if isinstance(fetched, LoadFailure) else default_collate(fetched.samples)


class Transformed(Dataset):
    """The validation set as the loader reads it: the evaluation transform applied, and
    unreadable samples reported in one line or replaced (always by the same ones)."""

    def __init__(self, base: Dataset, transform: Callable | None, skip_bad_samples: bool = False) -> None:
        self.base, self.transform, self.skip_bad_samples = base, transform, skip_bad_samples

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.base[index]
        return (self.transform(x) if self.transform else x), y

    def __getitems__(self, indices: list[int]) -> Fetched | LoadFailure:
        try:
            loaded = [
                load_or_replace(self.__getitem__, i, lambda i=i: i, self.base, "validation", self.skip_bad_samples)
                for i in indices
            ]
        except _Unreadable as exc:
            return LoadFailure(str(exc))
        return Fetched([sample for sample, _ in loaded], sum(replaced for _, replaced in loaded))


class EvalBatches:
    """The validation loader (`len` and iteration), raising a LoadFailure as one line."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if isinstance(batch, LoadFailure):
                raise DataError(batch.message)
            yield batch


class TrainBatches:
    """Micro-batches across epochs, with a checkpointable position (epoch, samples consumed).

    The loader yields chunks of one or more micro-batches (see IN_MEMORY_CHUNK); they are split
    here into views, so the position still moves one micro-batch at a time.
    """

    def __init__(
        self,
        loader: DataLoader,
        sampler: ResumableDistributedSampler,
        batch_size: int,
        skip_bad_samples: bool = False,
    ) -> None:
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.epoch, self.consumed = 0, 0
        self._iterator: Iterator | None = None
        self._ready: list = []  # micro-batches of the current chunk, last one first
        self._samples_per_micro_batch = batch_size * sampler.num_replicas
        # Unreadable samples replaced (data.skip_bad_samples): all ranks' total at the
        # checkpoint resumed from, and this rank's own since. Counted as batches are taken
        # (not as workers load them ahead), so the count matches the data position exactly.
        self.skip_bad_samples = skip_bad_samples
        self._bad_before, self._bad_here = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.samples_per_epoch // self.sampler.global_batch

    def bad_samples(self) -> int:
        """Unreadable samples replaced so far, all ranks together. One all-reduce when
        data.skip_bad_samples is on, so every rank calls it at the same step (logging, save)."""
        if not self.skip_bad_samples:
            return self._bad_before  # nothing is replaced: an unreadable sample stops the run
        return self._bad_before + int(all_reduce_sum(torch.tensor(self._bad_here)).item())

    def state_dict(self) -> dict[str, int]:
        """The data position, and with data.skip_bad_samples (or a count resumed from a run that
        had it) the bad-sample count as the all-ranks total, which any world size can resume.
        Collective when data.skip_bad_samples is on (see bad_samples)."""
        state = {"epoch": self.epoch, "samples_consumed": self.consumed}
        if self.skip_bad_samples or self._bad_before:
            state["bad_samples"] = self.bad_samples()
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["samples_consumed"])
        self._bad_before, self._bad_here = int(state.get("bad_samples", 0)), 0  # absent before it was counted
        self._iterator, self._ready = None, []

    def next_micro_batch(self) -> Any:
        if not self._ready:
            if self._iterator is None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.consumed)
                self._iterator = iter(self.loader)
            chunk = next(self._iterator)
            if isinstance(chunk, LoadFailure):
                raise DataError(chunk.message)
            *parts, replaced = chunk
            # Only chunks of one micro-batch (samples loaded one by one) can hold replacements,
            # so counting the chunk here counts exactly the micro-batch taken.
            self._bad_here += replaced
            self._ready = list(zip(*(part.split(self.batch_size) for part in parts), strict=True))[::-1]
        batch = self._ready.pop()
        self.consumed += self._samples_per_micro_batch
        if self.consumed >= self.sampler.samples_per_epoch:
            self.epoch, self.consumed, self._iterator, self._ready = self.epoch + 1, 0, None, []
        return batch


@dataclass
class DataPipeline:
    train: TrainBatches
    val_loader: EvalBatches
    spec: DataSpec
    batch: Batch  # the step's shape: ranks x micro-batch x accumulation
    baseline_val_loss: float | None
    device: torch.device = torch.device("cpu")
    # Images kept as uint8 are normalized on the device: (x - 255 mean) / (255 std) per channel.
    pixel_offset: torch.Tensor | None = None
    pixel_scale: torch.Tensor | None = None

    @property
    def global_batch(self) -> int:
        return self.batch.global_batch

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
    cfg: DataConfig, env: DistEnv, batch: Batch, seed: int, datasets: Datasets | None = None
) -> DataPipeline:
    """The run's batches, shaped as `batch` says, from the datasets `cfg` names, or from
    `datasets` when given."""
    datasets = datasets if datasets is not None else load_datasets(cfg, env)
    named = datasets.origin
    n_train = len(datasets.train)
    if n_train < batch.global_batch:
        raise DataError(
            f"{named} has {n_train} training samples, fewer than one global batch of "
            f"{batch.global_batch} (world {batch.world_size} x data.batch_size {batch.micro} x "
            f"train.grad_accum_steps {batch.accum})"
        )
    n_val = len(datasets.val)
    if n_val < env.world_size:
        # A rank with no validation batch would have nothing to evaluate while the others wait.
        raise DataError(
            f"{named} has {n_val} validation samples, fewer than the {env.world_size} "
            "processes: every rank evaluates at least one (use fewer processes or more validation samples)"
        )
    sampler = ResumableDistributedSampler(n_train, env.world_size, env.rank, seed, batch.global_batch)
    loader_kwargs: dict[str, Any] = dict(
        num_workers=cfg.num_workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        # Our own generator keeps DataLoader from drawing on the global RNG, which would
        # shift dropout and init randomness whenever an iterator is (re)created.
        generator=torch.Generator().manual_seed(seed),
    )
    train_set = SeededAugment(datasets.train, datasets.train_transform, seed, cfg.skip_bad_samples)
    train_loader = DataLoader(
        train_set,
        batch_sampler=ChunkSampler(sampler, batch.micro, IN_MEMORY_CHUNK if train_set.in_memory else 1),
        collate_fn=collate,
        **loader_kwargs,
    )
    val = Transformed(datasets.val, datasets.eval_transform, cfg.skip_bad_samples)
    val_loader = DataLoader(
        val,
        batch_size=cfg.eval_batch_size,
        sampler=EvalShard(len(val), env.world_size, env.rank),
        collate_fn=collate_eval,
        **loader_kwargs,
    )
    return DataPipeline(
        TrainBatches(train_loader, sampler, batch.micro, cfg.skip_bad_samples),
        EvalBatches(val_loader),
        datasets.spec,
        batch,
        datasets.baseline_val_loss,
        env.device,
        *uint8_normalization(datasets.normalize, env.device),
    )


def total_steps(max_steps: int | None, max_epochs: int | None, steps_per_epoch: int) -> int:
    """Total optimizer steps: whichever of max_steps and max_epochs ends first (one must be set)."""
    limits = [s for s in (max_steps, None if max_epochs is None else max_epochs * steps_per_epoch) if s is not None]
    return min(limits)
