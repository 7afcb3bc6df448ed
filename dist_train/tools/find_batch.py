"""`dist-train find-batch`: the largest micro-batch that fits, found as `data.batch_size: auto`
finds it (train/batch_search.py), printed with its trials and the override to use."""

from __future__ import annotations

from dist_train.config import Config
from dist_train.data.batch import split_global_batch
from dist_train.distributed import process_group
from dist_train.train.assembly import device_strategy
from dist_train.train.batch_search import BatchSearch, search


def find_batch(cfg: Config) -> BatchSearch:
    """`dist-train find-batch`: the search on every rank of this process group (or alone);
    rank 0 prints the trials and the override to use."""
    with process_group(cfg.parallel.collective_timeout_s, cfg.parallel.backend) as env:
        found = search(cfg, env, device_strategy(cfg, env))
        batch = split_global_batch(cfg, env.world_size, found.micro_batch, searched=True)
        if env.is_main:
            if found.max_memory_gb is None:
                limit = "until out of memory"
            else:
                estimate = " (on a CPU, of an estimate: see README)" if env.device.type != "cuda" else ""
                limit = f"data.max_memory_gb={found.max_memory_gb:g} per rank{estimate}"
            print(
                f"find-batch: {cfg.model.name} on {env.world_size} x {env.device.type}, {cfg.parallel.strategy}, "
                f"{cfg.train.precision}; sizes up to {found.bound} per rank, {limit}",
                flush=True,
            )
            print("\n".join([*found.table(), found.summary()]), flush=True)
            print(batch.describe(), flush=True)
            print(f"use: data.batch_size={batch.micro}", flush=True)
        return found
