"""`dist-train verify-tokens DIR`: every shard's header, size and ids against the manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

TAKES_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("verify-tokens", help="check a directory written by dist-train tokenize")
    parser.add_argument("directory", help="the --out directory of dist-train tokenize")


def run(args: argparse.Namespace) -> int:
    from dist_train.data.tokens import verify

    print(verify(Path(args.directory)))
    return 0
