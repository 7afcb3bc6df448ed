"""The CLI's verbs, one module each: `add_parser(subparsers)` declares a verb's arguments and
`run(args) -> exit code` carries it out through the Python API. cli.py only dispatches.

Verbs that do a run's work on every rank (train, and those added beside it) take the launch
flags too (see launch.add_launch_flags): given `--nproc-per-node`, the verb starts itself on
that many workers through torchrun, exactly as `dist-train launch` starts `train`.
"""

from dist_train.commands import (
    config,
    evaluate,
    export,
    find_batch,
    find_lr,
    launch,
    prune,
    quantize,
    report,
    tokenize,
    train,
    verify_tokens,
)

# In the order `dist-train --help` lists them.
VERBS = {
    "train": train,
    "launch": launch,
    "config": config,
    "eval": evaluate,
    "export": export,
    "report": report,
    "find-lr": find_lr,
    "find-batch": find_batch,
    "prune": prune,
    "quantize": quantize,
    "tokenize": tokenize,
    "verify-tokens": verify_tokens,
}
