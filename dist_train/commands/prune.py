"""`dist-train prune RUN_DIR --sparsity 0.5 [--schedule oneshot|gradual] [--out-name NAME] [key=value ...]`:
a trained run's smallest weights set to zero (global magnitude: the masks of
dist_train/components/sparsity.py; the report: dist_train/tools/prune.py) and fine-tuned into a
new run, in this process or on torchrun's workers (--nproc-per-node). The source run is only
read: the new run starts from its newest valid checkpoint through model.init_from."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dist_train.commands.launch import add_launch_flags, launched
from dist_train.commands.train import fit_here
from dist_train.config import Config, UserError, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prune", help="zero a trained run's smallest weights (global magnitude) and fine-tune them into a new run"
    )
    parser.add_argument("run_dir", help="a trained run directory, e.g. runs/digits (only read)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="on top of the run's config.yaml, e.g. train.max_steps=200"
    )
    parser.add_argument("--sparsity", type=float, required=True, help="fraction of Linear/Conv weights set to zero")
    parser.add_argument("--schedule", default="oneshot", choices=["oneshot", "gradual"])
    parser.add_argument("--out-name", default=None, help="the new run's run.name (default: NAME-pruned-SPARSITY)")
    parser.add_argument(
        "--max-accuracy-drop", type=float, default=0.01, help="a result losing more is not exported (default 0.01)"
    )
    parser.add_argument("--force", action="store_true", help="export the result even if it loses more accuracy")
    parser.add_argument("--timing-runs", type=int, default=30, help="timed forwards per latency in the report (median)")
    add_launch_flags(parser, default_nproc=None)


def prune_config(run_dir: Path, sparsity: float, schedule: str, out_name: str | None, overrides: list[str]) -> Config:
    """The pruned run's config: the source run's, starting from its newest valid checkpoint
    (recorded as model.init_from), with the user's overrides last. Checks all before anything runs."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    name = out_name or f"{load_config(config_file).run.name}-pruned-{sparsity:g}"

    def ours(source: object) -> list[str]:
        return [
            f"model.init_from={source}",
            f"prune.sparsity={sparsity!r}",
            f"prune.schedule={schedule}",
            f"run.name={name}",
        ]

    cfg = load_config(config_file, [*ours("null"), *overrides])
    if cfg.run_dir.resolve() == run_dir.resolve():
        raise UserError(f"the pruned run would overwrite its source {run_dir}; give another --out-name")
    from dist_train.checkpoint.export import weights_checkpoint  # torch's checkpoint modules: only when pruning

    newest = weights_checkpoint(run_dir).resolve()  # the source must hold a valid checkpoint
    # The same command continues a pruned run: it keeps the source it started from even when
    # the source has trained on since (on resume the run's own checkpoint wins over init_from).
    started = cfg.run_dir / "config.yaml"
    source = load_config(started).model.init_from if started.is_file() else None
    return load_config(config_file, [*ours(source or newest), *overrides])


def run(args: argparse.Namespace) -> int:
    from dist_train.tools.compress_report import check_options

    check_options(args.timing_runs, args.max_accuracy_drop)
    run_dir = Path(args.run_dir)
    cfg = prune_config(run_dir, args.sparsity, args.schedule, args.out_name, args.overrides)
    if args.nproc_per_node is not None:
        flags = ["--sparsity", repr(args.sparsity), "--schedule", args.schedule]
        flags += [] if args.out_name is None else ["--out-name", args.out_name]
        code = launched(args, cfg, "prune", [str(run_dir), *flags, *args.overrides])
    else:
        code = fit_here(cfg)
    # Once, in the process the user started: not in each of torchrun's workers.
    if code == 0 and "TORCHELASTIC_RUN_ID" not in os.environ:
        from dist_train.tools.prune import write_report

        write_report(cfg, args.timing_runs, args.max_accuracy_drop, args.force)
    return code
