"""Stop on a signal (SLURM's warning before the time limit, SIGTERM) at an optimizer-step
boundary that every rank agrees on, so one consistent checkpoint can be saved.

The handler only sets a flag: saving inside a signal handler can deadlock on a collective or
be cut off half-way. Ranks exchange their flags through an all-reduce on a CPU (gloo) group
that is issued at one step and read at the next, so checking every step costs no device sync.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

# EX_TEMPFAIL: stopped early with a checkpoint; running the same command again continues.
PREEMPTED_EXIT_CODE = 75
# Written into the run directory by rank 0 after such a stop, removed when the run starts
# again. Workers under torchrun exit 0 (a non-zero exit would make torchrun kill the other
# ranks mid-teardown, or restart them); `dist-train launch` turns the marker into exit 75.
STOPPED_MARKER = "stopped_early.json"


class StopRequest:
    def __init__(self, signal_names: list[str]) -> None:
        self.signals = [signal.Signals[name] for name in dict.fromkeys(signal_names)]
        self.received = 0  # the signal number this rank received, 0 for none
        self.previous: dict[signal.Signals, object] = {}
        self.group = None
        self.pending = None
        self.flag = torch.zeros(1, dtype=torch.int64)

    def __enter__(self) -> StopRequest:
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self._handle)
        if dist.is_initialized():
            self.group = dist.new_group(backend="gloo")  # collective: every rank, same place
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def poll(self) -> str | None:
        """Once per optimizer step on every rank: the name of the signal all ranks now agree
        to stop on, or None. A signal is acted on one or two steps after it arrives."""
        if self.group is None:
            return signal.Signals(self.received).name if self.received else None
        agreed = 0
        if self.pending is not None:
            self.pending.wait()  # issued a step ago; a CPU tensor, so no device sync
            agreed = int(self.flag.item())
        self.flag.fill_(self.received)  # the previous all-reduce into it has completed
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return signal.Signals(agreed).name if agreed else None

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.pending is not None and exc_info[0] is None:
            self.pending.wait()  # every rank issued it; leave no collective in flight
