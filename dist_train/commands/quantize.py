"""`dist-train quantize RUN_DIR_OR_SAFETENSORS --method M --out DIR [key=value ...]`: post-training
int8 of a run's model, and the compression report against the original."""

from __future__ import annotations

import argparse
from pathlib import Path

# tools/quantize.py (torch, torchao) is imported only to quantize, not to build the CLI's parser
# on every start; tests/test_quantize.py checks these are its METHODS.
METHODS = ("int8-dynamic", "int8-weight-only", "int8-static")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("quantize", help="int8 post-training quantization with torchao, and its report")
    parser.add_argument("source", help="a run directory (its newest valid checkpoint), or a dist-train export file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="on top of the run's config, e.g. data.root=/other/data"
    )
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--out", required=True, help="a new folder: model.pt2, recipe.json, compress_report.md/.json")
    parser.add_argument("--config", default=None, help="the run's config.yaml, for a safetensors SOURCE")
    parser.add_argument(
        "--calibration-batches", type=int, default=8, help="int8-static: training batches that set activation ranges"
    )
    parser.add_argument(
        "--max-accuracy-drop", type=float, default=0.01, help="a result losing more is not written (default 0.01)"
    )
    parser.add_argument("--force", action="store_true", help="write the result even if it loses more accuracy")
    parser.add_argument("--timing-runs", type=int, default=30, help="timed forwards per latency (median)")


def run(args: argparse.Namespace) -> int:
    from dist_train.tools.quantize import quantize

    quantize(
        Path(args.source),
        args.method,
        Path(args.out),
        None if args.config is None else Path(args.config),
        args.overrides,
        args.calibration_batches,
        args.max_accuracy_drop,
        args.force,
        args.timing_runs,
    )
    return 0
