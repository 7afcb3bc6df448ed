"""`dist-train find-lr CONFIG [key=value ...]`: the LR range test (dist_train/tools/find_lr.py), in this
process or, with --nproc-per-node, on torchrun's workers with the config's real global batch."""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_train.commands.launch import add_launch_flags, launched
from dist_train.config import UserError, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("find-lr", help="LR range test: loss against an exponentially rising lr, and an lr to use")
    parser.add_argument("config", help="YAML config file, e.g. configs/digits.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--min-lr", type=float, default=1e-7, help="the first step's lr (default 1e-7)")
    parser.add_argument("--max-lr", type=float, default=10.0, help="the last step's lr (default 10)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument(
        "--out", default=None, help="a new folder for lr_find.csv and lr_find.png (default: RUN_DIR-lr_find)"
    )
    add_launch_flags(parser, default_nproc=None)


def run(args: argparse.Namespace) -> int:
    from dist_train.tools.find_lr import RangeOptions, default_out, find_lr, launch_config, out_problem

    cfg = load_config(args.config, args.overrides)
    options = RangeOptions(args.min_lr, args.max_lr, args.steps)
    options.check()  # before any worker starts, as the config
    out = Path(args.out) if args.out else default_out(cfg)
    if args.nproc_per_node is not None:
        problem = out_problem(out)
        if problem:
            raise UserError(problem)
        flags = ["--min-lr", repr(args.min_lr), "--max-lr", repr(args.max_lr), "--steps", str(args.steps)]
        flags += ["--out", str(out)]
        return launched(args, launch_config(cfg, out), "find-lr", [args.config, *args.overrides, *flags])
    find_lr(cfg, options, out)
    return 0
