"""Data: datasets by name (datasets.py), keyed augmentation (augmentation.py), which samples
each rank reads and from where (sampler.py), and the batches the trainer gets (loader.py).

Two decisions make resume exact and independent of workers and world size:
- The data position is a *global* count of samples consumed from the epoch's permutation.
  Rank r reads remaining[r::world], so after any number of whole steps the ranks together
  have consumed exactly a prefix of the permutation.
- Augmentation randomness is a pure function of (seed, epoch, sample index): each sample
  seeds its own RNG, so neither DataLoader worker seeds nor the resume point change it.
"""

from dist_train.data.augmentation import RandomShift
from dist_train.data.batch import Batch
from dist_train.data.datasets import (
    DataError,
    Datasets,
    DataSpec,
    build_datasets,
    datasets_from_objects,
    stdlib_sources,
    unigram_loss,
)
from dist_train.data.loader import (
    IN_MEMORY_CHUNK,
    DataPipeline,
    SeededAugment,
    TrainBatches,
    build_pipeline,
    total_steps,
)
from dist_train.data.sampler import ChunkSampler, EvalShard, ResumableDistributedSampler, SampleKeys

__all__ = [
    "IN_MEMORY_CHUNK",
    "Batch",
    "ChunkSampler",
    "DataError",
    "DataPipeline",
    "DataSpec",
    "Datasets",
    "EvalShard",
    "RandomShift",
    "ResumableDistributedSampler",
    "SampleKeys",
    "SeededAugment",
    "TrainBatches",
    "build_datasets",
    "build_pipeline",
    "datasets_from_objects",
    "stdlib_sources",
    "total_steps",
    "unigram_loss",
]
