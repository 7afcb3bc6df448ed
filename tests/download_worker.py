"""Run under torchrun with 2 processes: who fetches a downloadable dataset, when, and what every
rank learns when one of them fails. Rank 0 writes the findings as JSON for tests/test_data.py.

    python -m torch.distributed.run --nproc-per-node 2 tests/download_worker.py SHARED_ROOT BAD_ROOT OUT.json

SHARED_ROOT holds MNIST's files (torchvision then finds them and downloads nothing); BAD_ROOT
lies under a regular file, so fetching into it fails at once, as a download would offline.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import dist_train.data.loader as loader
from dist_train.config import DataConfig
from dist_train.data import DataError
from dist_train.distributed import all_gather_objects, process_group

calls: list[dict] = []
build_datasets = loader.build_datasets


def recorded_build(cfg: DataConfig, download: bool | None = None):
    start = time.monotonic()
    try:
        return build_datasets(cfg, download)
    finally:
        calls.append({"download": download, "start": start, "end": time.monotonic()})


loader.build_datasets = recorded_build


def main(shared_root: str, bad_root: str, out: Path) -> None:
    findings = {}
    with process_group() as env:
        # one_node: the real local ranks (0 and 1 on one node). two_nodes: each rank as the
        # first of its own node, sharing a root or (bad) rank 1 with a node-local one it cannot fill.
        cases = {
            "one_node": (env, shared_root),
            "two_nodes": (dataclasses.replace(env, local_rank=0), shared_root),
            "two_nodes_bad": (dataclasses.replace(env, local_rank=0), shared_root if env.rank == 0 else bad_root),
        }
        for name, (case_env, root) in cases.items():
            calls.clear()
            try:
                datasets = loader.load_datasets(DataConfig(dataset="mnist", root=root, download=True), case_env)
                outcome = {"train_samples": len(datasets.train)}
            except DataError as exc:
                outcome = {"error": str(exc)}
            findings[name] = all_gather_objects({"calls": list(calls), **outcome})
        if env.is_main:
            out.write_text(json.dumps(findings))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
