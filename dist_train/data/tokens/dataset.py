"""`data.dataset: tokens`: windows over memory-mapped shards, for the resumable sampler."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dist_train.data.tokens.shards import open_shard, read_header, read_manifest


class TokenWindows(Dataset):
    """Non-overlapping windows of seq_len + 1 tokens over memory-mapped shards: (input,
    next-token targets), as data.dataset=text serves bytes. A window never straddles two
    shards, so item i is found from per-shard window counts; nothing is read until asked."""

    def __init__(self, paths: list[Path], seq_len: int) -> None:
        self.paths, self.seq_len = [Path(p) for p in paths], seq_len
        headers = [read_header(p) for p in self.paths]
        self.vocab_size = max((h.vocab_size for h in headers), default=0)
        per_shard = [max(0, (h.count - 1) // seq_len) for h in headers]
        # Windows before the end of each shard, as Python ints: bisect on a list takes a
        # quarter of np.searchsorted's time per sample.
        self.ends = list(itertools.accumulate(per_shard))
        self.tokens_total = sum(h.count for h in headers)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        shard = bisect.bisect_right(self.ends, index)
        local = index - (self.ends[shard - 1] if shard else 0)
        tokens = self._maps.get(shard)
        if tokens is None:
            # A plain ndarray view of the mapping: slicing an np.memmap costs 30x more (it
            # builds a memmap object per slice), which was most of a sample's time.
            tokens = self._maps[shard] = open_shard(self.paths[shard]).view(np.ndarray)
        window = torch.from_numpy(tokens[local * self.seq_len : (local + 1) * self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:
        # A memmap pickles as a full in-memory copy: a spawned loader worker maps its own.
        return {**self.__dict__, "_maps": {}}


def token_datasets(directory: Path, seq_len: int) -> tuple[TokenWindows, TokenWindows, dict]:
    """Train and validation windows of a tokenized directory, and its manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    train, val = (
        TokenWindows([directory / s["file"] for s in manifest["shards"][split]], seq_len) for split in ("train", "val")
    )
    return train, val, manifest


def iter_documents(directory: Path, split: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(source path, token ids) of each document in the manifest, the separator left out."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    maps: dict[str, np.ndarray] = {}
    for doc in manifest["documents"]:
        if split is not None and doc["split"] != split:
            continue
        if doc["shard"] not in maps:
            maps[doc["shard"]] = open_shard(directory / doc["shard"])
        tokens = maps[doc["shard"]]
        ids = tokens[doc["offset"] : doc["offset"] + doc["tokens"]]
        if manifest.get("eot_id") is not None and len(ids) and ids[-1] == manifest["eot_id"]:
            ids = ids[:-1]
        yield doc["path"], np.asarray(ids)
