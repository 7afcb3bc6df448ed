"""`dist-train eval RUN_DIR [--step N] [--split val|train] [--out DIR] [key=value ...]`: a
checkpoint's metrics as a table, in this process or on torchrun's workers (--nproc-per-node)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_train.commands.launch import add_launch_flags, launched


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval", help="evaluate a checkpoint of a run on its validation split (any strategy and world size)"
    )
    parser.add_argument("run_dir", help="a run directory, e.g. runs/digits: its config.yaml and checkpoints")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="on top of the run's config.yaml, e.g. data.root=/other/data"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest valid)")
    parser.add_argument(
        "--split", default="val", choices=["val", "train"], help="train: the training samples, without augmentation"
    )
    parser.add_argument("--out", default=None, help="a new folder for the results (default: RUN_DIR/eval/SPLIT-step_N)")
    add_launch_flags(parser, default_nproc=None)


def run(args: argparse.Namespace) -> int:
    from dist_train.tools.evaluate import prepare, run_eval

    run_dir, out = Path(args.run_dir), None if args.out is None else Path(args.out)
    if args.nproc_per_node is not None:
        # Checked here, before any worker starts; world size 2 stands for any number above one.
        cfg = prepare(run_dir, args.overrides, args.step, out, world_size=2)
        flags = ["--split", args.split]
        flags += [] if args.step is None else ["--step", str(args.step)]
        flags += [] if out is None else ["--out", str(out)]
        return launched(args, cfg, "eval", [str(run_dir), *flags, *args.overrides])
    run_eval(run_dir, args.overrides, args.step, args.split, out)
    return 0
