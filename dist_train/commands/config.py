"""`dist-train config CONFIG [key=value ...]`: the resolved config and the step's batch it implies,
without loading data or building a model; `dist-train config --keys [PREFIX]`: every key with its
type, default and help (`--markdown`: the README's table)."""

from __future__ import annotations

import argparse

from dist_train.config import Config, UserError, dump_yaml, key_docs, keys_table, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="print the resolved config and its batch plan, or list every config key")
    parser.add_argument(
        "config", nargs="?", help="YAML config file, e.g. configs/digits.yaml (with --keys: a key prefix)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.global_batch=64")
    parser.add_argument("--keys", action="store_true", help="list every config key, or those starting with a prefix")
    parser.add_argument("--markdown", action="store_true", help="with --keys: as the README's markdown table")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes per node the plan is for")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes the plan is for")


def run(args: argparse.Namespace) -> int:
    if args.keys:  # `--keys train.`: the positional is a key prefix, wherever the flags stand
        if args.overrides:
            raise UserError("config --keys takes a key prefix, not key=value overrides")
        print(list_keys(args.config or "", args.markdown), end="")
        return 0
    if args.config is None:
        raise UserError("config needs a CONFIG file, e.g. configs/digits.yaml, or --keys")
    if args.markdown:
        raise UserError("--markdown goes with --keys")
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise UserError("--nproc-per-node and --nnodes must be >= 1")
    cfg = load_config(args.config, args.overrides)
    # Comment lines, so the output as a whole still parses as the config's YAML.
    plan = plan_lines(cfg, args.nnodes * args.nproc_per_node)
    print(dump_yaml(cfg) + "".join(f"# {line}\n" for line in plan), end="")
    return 0


def list_keys(prefix: str, markdown: bool) -> str:
    docs = [doc for doc in key_docs() if doc.key.startswith(prefix)]
    if not docs:
        raise UserError(f"no config key starts with {prefix!r}")
    if markdown:
        return keys_table(prefix)
    # Backticks mark code in the README; on a terminal they are noise.
    return "".join(f"{doc.key} = {doc.default}  ({doc.type})\n    {doc.help.replace('`', '')}\n" for doc in docs)


def plan_lines(cfg: Config, world: int) -> list[str]:
    """What the run's plan will say that the config alone decides: the step's batch. Steps per
    epoch need the dataset's size, so they are left to the run's log."""
    # dist_train.data's __init__ imports torch: not at parse time.
    from dist_train.data.batch import check_global_batch, split_global_batch

    where = f"plan on {world} process{'es' if world > 1 else ''}"
    if cfg.data.batch_size == "auto":
        check_global_batch(cfg, world)
        if cfg.train.global_batch is not None:
            batch = f"global batch {cfg.train.global_batch} ({world} x auto x the accumulation that makes it up)"
        else:
            batch = f"global batch {world} x auto x {cfg.train.grad_accum_steps} accumulation"
        batch += "; the micro-batch is searched at start-up (dist-train find-batch runs that search now)"
    else:
        batch = split_global_batch(cfg, world, cfg.data.batch_size).describe()
    return [f"{where}: {batch}", f"run directory {cfg.run_dir}", "steps per epoch need the dataset: the run logs them"]
