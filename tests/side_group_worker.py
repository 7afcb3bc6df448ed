"""Run under torchrun with 2 ranks: rank 0 enters StopRequest, whose gloo side group cannot form.

    side_group_worker.py late      rank 1 never joins in time (formation timeout)
    side_group_worker.py ifname    GLOO_SOCKET_IFNAME names no interface of this machine

Rank 0 prints what `dist-train train` would print and exits with its code."""

import os
import sys
import time

import torch.distributed as dist

from dist_train.errors import UserError
from dist_train.preemption import StopRequest

mode = sys.argv[1]
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    time.sleep(20 if mode == "late" else 5)  # far past rank 0's 2 s formation timeout
    sys.exit(0)
if mode == "ifname":
    os.environ["GLOO_SOCKET_IFNAME"] = "nosuchif0"  # read when the side group's device is made
try:
    with StopRequest(["SIGUSR1"], collective_timeout_s=2):
        pass
except UserError as exc:
    print(f"error (rank 0): {exc}", file=sys.stderr, flush=True)
    os._exit(2)  # as the CLI does; skip teardown of a group whose peer is elsewhere
print("formed", flush=True)
