"""`dist-train report RUN_DIR [RUN_DIR ...] [--out DIR]`: plots, report.html and a text summary."""

from __future__ import annotations

import argparse
from pathlib import Path

# Verbs without key=value overrides: cli.py refuses extra arguments for them.
TAKES_OVERRIDES = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report", help="plot one run or several (overlaid) to PNGs and a self-contained report.html, with a summary"
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, e.g. runs/digits")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: RUN_DIR/report for one run; compare-NAME-NAME... beside several)",
    )


def run(args: argparse.Namespace) -> int:
    from dist_train.tools.report import write_report  # matplotlib is imported only when drawing

    report = write_report([Path(p) for p in args.run_dirs], Path(args.out) if args.out else None)
    print(report.summary)
    plots = ", ".join(path.name for path in report.files[1:])
    print(f"wrote {report.files[0]} and {len(report.files) - 1} plots in {report.out}: {plots}")
    return 0
