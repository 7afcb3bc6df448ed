"""`dist-train VERB ...`: a thin dispatcher over the verbs in dist_train/commands/.
User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from dist_train.commands import VERBS
from dist_train.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-train", description="Train with DDP or FSDP on torchrun, or on one process."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS.values():
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after flags; argparse collects only the first run of them.
    args, extra = parser.parse_known_args(argv)
    verb = VERBS[args.command]
    if extra and not getattr(verb, "TAKES_OVERRIDES", True):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for item in extra:
        if item.startswith("-") or "=" not in item:
            parser.error(f"unrecognized argument {item!r} (overrides look like key=value)")
        args.overrides.append(item)
    try:
        return verb.run(args)
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
