"""`dist-train train|launch CONFIG [key=value ...]`. User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from dist_train.config import UserError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-train", description="Train with DDP on torchrun, or on one process.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train in this process (joins torchrun's process group if present)")
    train.add_argument("config", help="YAML config file, e.g. configs/digits.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.05 train.max_steps=200")

    launch = sub.add_parser("launch", help="start workers with torchrun, each running `dist-train train`")
    launch.add_argument("config")
    launch.add_argument("overrides", nargs="*", metavar="key=value")
    launch.add_argument(
        "--nproc-per-node",
        default="auto",
        help="workers on this node: a number or 'auto' (the visible GPUs, or 1 on CPU)",
    )
    # Inside a multi-node SLURM srun step, the node flags default to the allocation's.
    launch.add_argument("--nnodes", type=int, default=None, help="default 1, or the SLURM allocation's")
    launch.add_argument("--node-rank", type=int, default=None, help="default 0, or SLURM_NODEID")
    launch.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of node 0 (SLURM: the first node)")
    launch.add_argument("--rdzv-id", default=None, help="the same on every node of one job (SLURM: the job id)")
    launch.add_argument("--max-restarts", type=int, default=0, help="restarts of the worker group after a failure")
    export = sub.add_parser("export", help="write a checkpoint's full weights to a safetensors file")
    export.add_argument("run_dir", help="a run directory, e.g. runs/digits, or one of its checkpoint directories")
    export.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest valid)")
    export.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after launch flags; argparse collects only the first run.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "export":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for item in extra:
        if item.startswith("-") or "=" not in item:
            parser.error(f"unrecognized argument {item!r} (overrides look like key=value)")
        args.overrides.append(item)
    try:
        if args.command == "export":
            from dist_train.export import export

            source = export(Path(args.run_dir), Path(args.out), args.step, args.dtype)
            print(f"exported {source} to {args.out} ({args.dtype})")
            return 0
        cfg = load_config(args.config, args.overrides)  # validated before any worker starts
        if args.command == "launch":
            from dist_train.launcher import LaunchOptions, from_slurm, launch

            flags = {k: getattr(args, k) for k in ("nnodes", "node_rank", "rdzv_endpoint", "rdzv_id")}
            given = {k for k, v in flags.items() if v is not None}
            opts = LaunchOptions(args.nproc_per_node, max_restarts=args.max_restarts, **{k: flags[k] for k in given})
            return launch(cfg, args.config, args.overrides, from_slurm(opts, given, os.environ))
        from dist_train.api import fit
        from dist_train.preemption import PREEMPTED_EXIT_CODE

        stopped_early = fit(cfg).stopped_by is not None
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # then the launcher reports it
        return PREEMPTED_EXIT_CODE if stopped_early and not under_torchrun else 0
    except UserError as exc:
        rank = os.environ.get("RANK")
        if rank is None or os.environ.get("WORLD_SIZE", "1") == "1":
            print(f"error: {exc}", file=sys.stderr)
        elif first_to_report(str(exc)):
            print(f"error (rank {rank}): {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def first_to_report(message: str) -> bool:
    """Whether this worker is the first of its node to report `message`.

    Most mistakes (a config key, a missing file, a checkpoint) stop every rank with the same
    line; printing it once per rank buries it. The first rank to claim the message's file in
    a directory private to this torchrun job and restart prints it; a rank-specific message
    is another file, so it is still printed.
    """
    job = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    claims = Path(tempfile.gettempdir()) / f"dist_train-errors-{getpass.getuser()}-{job}"
    try:
        claims.mkdir(exist_ok=True)
        os.close(os.open(claims / hashlib.sha1(message.encode()).hexdigest(), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    except OSError:
        pass  # no temporary directory: better twice than never
    return True


if __name__ == "__main__":
    sys.exit(main())
