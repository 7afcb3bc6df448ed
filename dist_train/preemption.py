"""Stop on a signal (SLURM's warning before the time limit, SIGTERM) at an optimizer-step
boundary that every rank agrees on, so one consistent checkpoint can be saved.

The handler only sets a flag: saving inside a signal handler can deadlock on a collective or
be cut off half-way. Ranks exchange their flags through an all-reduce on a CPU (gloo) group
that is issued at one check and read at the next, so a check costs no device sync. Checks
come about once a second, not every step: on a fast step the exchange itself was a measurable
cost. Every rank must check at the same steps, so each exchange also carries the ranks'
proposals for when the check after next happens, and the earliest proposal wins.
"""

from __future__ import annotations

import datetime
import signal
import socket
import time
from types import FrameType

import torch
import torch.distributed as dist

from dist_train.errors import UserError

# EX_TEMPFAIL: stopped early with a checkpoint; running the same command again continues.
PREEMPTED_EXIT_CODE = 75
# Written into the run directory by rank 0 after such a stop, removed when the run starts
# again. Workers under torchrun exit 0 (a non-zero exit would make torchrun kill the other
# ranks mid-teardown, or restart them); `dist-train launch` turns the marker into exit 75.
STOPPED_MARKER = "stopped_early.json"


class StopRequest:
    CHECK_EVERY_S = 1.0  # between agreements; a signal is acted on within about two of them
    MAX_CHECK_INTERVAL = 1000  # steps
    # The side group forms when training starts, when every rank is there within seconds; a
    # rank that cannot connect (gloo on an address other nodes cannot reach) fails after this.
    MAX_FORM_TIMEOUT_S = 300.0

    def __init__(self, signal_names: list[str], collective_timeout_s: float = 1800.0) -> None:
        self.form_timeout_s = min(collective_timeout_s, self.MAX_FORM_TIMEOUT_S)
        self.signals = [signal.Signals[name] for name in dict.fromkeys(signal_names)]
        self.received = 0  # the signal number this rank received, 0 for none
        self.previous: dict[signal.Signals, object] = {}
        self.group = None
        self.pending = None
        # [signal number, -proposed step of the check after next]: one MAX all-reduce
        # agrees on any rank's signal and on the earliest proposal.
        self.flag = torch.zeros(2, dtype=torch.int64)
        self.next_check: int | None = None  # the step of the next check, the same on every rank
        self.last_check = (0, 0.0)  # (step, time) of this rank's previous check

    def __enter__(self) -> StopRequest:
        if dist.is_initialized():
            self.group = self._side_group()
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _side_group(self) -> dist.ProcessGroup:
        """A gloo group for the stop flags (collective: every rank, same place). It binds to
        the address the host name resolves to unless GLOO_SOCKET_IFNAME names an interface."""
        timeout = datetime.timedelta(seconds=self.form_timeout_s)
        try:
            return dist.new_group(backend="gloo", timeout=timeout)
        except RuntimeError as exc:  # DistError and gloo's enforce failures alike
            said = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            host = socket.gethostname()
            raise UserError(
                f"the gloo group for stop signals did not form within {self.form_timeout_s:g} s on {host} "
                f"({said[:160]}); gloo uses the address {host} resolves to unless GLOO_SOCKET_IFNAME names "
                "the interface the nodes reach each other on: set it (and NCCL_SOCKET_IFNAME), e.g. "
                "SOCKET_IFNAME=eth0 for slurm/train.sbatch or launch/multi_node.sh"
            ) from None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def poll(self, step: int) -> str | None:
        """After every optimizer step, on every rank, with the same step numbers: the name of
        the signal all ranks now agree to stop on, or None."""
        if self.group is None:
            return signal.Signals(self.received).name if self.received else None
        if self.next_check is None:
            self.next_check = step  # the first call: every rank starts at the same step
        if step < self.next_check:
            return None
        agreed, check_after = 0, step + 1  # the first exchange: check again at the next step
        if self.pending is not None:
            self.pending.wait()  # issued at the previous check; a CPU tensor, so no device sync
            agreed, check_after = int(self.flag[0]), -int(self.flag[1])
        now = time.monotonic()
        last_step, last_time = self.last_check
        seconds_per_step = (now - last_time) / max(1, step - last_step) if self.pending is not None else None
        interval = 1 if not seconds_per_step else int(self.CHECK_EVERY_S / seconds_per_step)
        self.last_check = (step, now)
        self.flag[0], self.flag[1] = self.received, -(check_after + min(max(interval, 1), self.MAX_CHECK_INTERVAL))
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.next_check = check_after
        return signal.Signals(agreed).name if agreed else None

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.pending is not None and exc_info[0] is None:
            self.pending.wait()  # every rank issued it; leave no collective in flight
