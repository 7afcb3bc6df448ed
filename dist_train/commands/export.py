"""`dist-train export RUN_DIR --out FILE`: a checkpoint's full weights as one safetensors file."""

from __future__ import annotations

import argparse
from pathlib import Path

# Verbs without key=value overrides: cli.py refuses extra arguments for them.
TAKES_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="write a checkpoint's full weights to a safetensors file")
    parser.add_argument("run_dir", help="a run directory, e.g. runs/digits, or one of its checkpoint directories")
    parser.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest valid)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])


def run(args: argparse.Namespace) -> int:
    from dist_train.checkpoint.export import export

    source = export(Path(args.run_dir), Path(args.out), args.step, args.dtype)
    print(f"exported {source} to {args.out} ({args.dtype})")
    return 0
