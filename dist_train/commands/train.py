"""`dist-train train CONFIG [key=value ...]`: train in this process, or as one of torchrun's workers."""

from __future__ import annotations

import argparse
import os

from dist_train.commands.launch import add_launch_flags, launched
from dist_train.config import Config, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train in this process (joins torchrun's process group if present)")
    parser.add_argument("config", help="YAML config file, e.g. configs/digits.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.05 train.max_steps=200")
    add_launch_flags(parser, default_nproc=None)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # validated before any worker starts
    if args.nproc_per_node is not None:
        return launched(args, cfg, "train", [args.config, *args.overrides])
    return fit_here(cfg)


def fit_here(cfg: Config) -> int:
    """Train `cfg` in this process; the exit code (preempted: the requeue code, unless torchrun reports it)."""
    from dist_train.api import fit
    from dist_train.preemption import PREEMPTED_EXIT_CODE

    stopped_early = fit(cfg).stopped_by is not None
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # then the launcher reports it
    return PREEMPTED_EXIT_CODE if stopped_early and not under_torchrun else 0
