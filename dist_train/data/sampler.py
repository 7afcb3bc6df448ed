"""Which samples each rank reads, in what order, from where in the epoch: the resumable
sharded sampler for training and the padding-free shard for evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DistributedSampler


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


class EvalShard(torch.utils.data.Sampler[int]):
    """Rank r evaluates samples r, r+world, ...: every sample once, none padded or repeated."""

    def __init__(self, dataset_len: int, world_size: int, rank: int) -> None:
        self.indices = list(range(rank, dataset_len, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
