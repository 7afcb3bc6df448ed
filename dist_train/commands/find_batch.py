"""`dist-train find-batch CONFIG [key=value ...]`: the largest micro-batch that fits on every rank
(dist_train/tools/find_batch.py), in this process or on torchrun's workers with --nproc-per-node."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

from dist_train.commands.launch import add_launch_flags, launched
from dist_train.config import load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("find-batch", help="the largest micro-batch (data.batch_size) that fits, on every rank")
    parser.add_argument("config", help="YAML config file, e.g. configs/digits.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="memory a trial may use per rank, GiB (data.max_memory_gb; on a CPU it caps an estimate)",
    )
    add_launch_flags(parser, default_nproc=None)


def run(args: argparse.Namespace) -> int:
    from dist_train.tools.find_batch import find_batch

    overrides = list(args.overrides)
    if args.max_memory_gb is not None:
        overrides.append(f"data.max_memory_gb={args.max_memory_gb!r}")  # validated with the config
    cfg = load_config(args.config, overrides)
    if args.nproc_per_node is not None:
        # The search writes nothing: NCCL flight-recorder dumps go to the temporary folder rather
        # than creating the run's directory.
        scratch = dataclasses.replace(cfg.run, output_dir=tempfile.gettempdir(), name="dist_train-find-batch")
        return launched(args, dataclasses.replace(cfg, run=scratch), "find-batch", [args.config, *overrides])
    find_batch(cfg)
    return 0
