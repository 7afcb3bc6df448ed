"""`dist-train launch CONFIG [key=value ...] [launch flags]`: `train` on workers started by torchrun.

The launch flags are shared with every verb that works on all ranks: `add_launch_flags` adds
them to a verb's parser and `launched` starts the verb on the workers.
"""

from __future__ import annotations

import argparse
import os

from dist_train.config import Config, load_config


def add_launch_flags(parser: argparse.ArgumentParser, default_nproc: str | None) -> None:
    """torchrun's settings. With default_nproc=None the verb runs in this process unless
    --nproc-per-node is given."""
    parser.add_argument(
        "--nproc-per-node",
        default=default_nproc,
        help="workers on this node: a number or 'auto' (the visible GPUs, or 1 on CPU)",
    )
    # Inside a multi-node SLURM srun step, the node flags default to the allocation's.
    parser.add_argument("--nnodes", type=int, default=None, help="default 1, or the SLURM allocation's")
    parser.add_argument("--node-rank", type=int, default=None, help="default 0, or SLURM_NODEID")
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of node 0 (SLURM: the first node)")
    parser.add_argument("--rdzv-id", default=None, help="the same on every node of one job (SLURM: the job id)")
    parser.add_argument("--max-restarts", type=int, default=0, help="restarts of the worker group after a failure")


def launched(args: argparse.Namespace, cfg: Config, verb: str, worker_args: list[str]) -> int:
    """Start `dist-train VERB WORKER_ARGS` on torchrun's workers, with the launch flags in `args`."""
    from dist_train.launcher import LaunchOptions, from_slurm, launch

    flags = {k: getattr(args, k) for k in ("nnodes", "node_rank", "rdzv_endpoint", "rdzv_id")}
    given = {k for k, v in flags.items() if v is not None}
    opts = LaunchOptions(args.nproc_per_node, max_restarts=args.max_restarts, **{k: flags[k] for k in given})
    return launch(cfg, worker_args[0], worker_args[1:], from_slurm(opts, given, os.environ), verb=verb)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("launch", help="start workers with torchrun, each running `dist-train train`")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    add_launch_flags(parser, default_nproc="auto")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # validated before any worker starts
    return launched(args, cfg, "train", [args.config, *args.overrides])
