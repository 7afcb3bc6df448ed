"""The process group (from torchrun's environment: which device, which backends) and the
collectives the rest of dist_train uses. Process-wide settings are in process_settings.py."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dist_train.config import UserError, resolve_auto


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def read_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables; a lone process is rank 0 of 1."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return rank, local_rank, world_size


def select_device(local_rank: int, local_world_size: int, share_gpus: bool = False) -> torch.device:
    """GPU number `local_rank` where CUDA is available, else the CPU. More processes on a node
    than GPUs is one line here rather than NCCL's "Duplicate GPU detected" from inside a
    collective (torchrun started by hand; `dist-train launch` checks it before starting), unless
    `share_gpus` (parallel.backend=gloo): then ranks take the GPUs in turn."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if share_gpus:
        return torch.device("cuda", local_rank % gpus)
    if max(local_world_size, local_rank + 1) > gpus:
        raise UserError(
            f"{max(local_world_size, local_rank + 1)} processes on this node but {gpus} GPU(s) visible: two ranks "
            f"would share a GPU, which NCCL refuses; start at most {gpus} per node (torchrun --nproc-per-node), "
            "change CUDA_VISIBLE_DEVICES, or set parallel.backend=gloo"
        )
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device, setting: str = "auto") -> str:
    """The process group's backends (parallel.backend). On CUDA NCCL carries GPU tensors and
    gloo CPU tensors: FSDP's CPU offload reduces the norm of CPU gradient shards over the
    default group, which a NCCL-only group cannot do ("No backend type associated with device
    type cpu"). gloo alone carries GPU tensors through host memory."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" and setting == "auto" else "gloo"


def use_channels_last(
    setting: bool | str, device: torch.device, input_shape: tuple[int, ...], sharded: bool = False
) -> bool:
    """train.channels_last: only images (batches of 4 dimensions) have a channels_last
    layout; `auto` uses it on CUDA, where tensor-core convolutions read NHWC natively, unless
    FSDP shards the model (`sharded`): FSDP2 takes only contiguous parameters."""
    is_image = len(input_shape) == 3
    return is_image and resolve_auto(setting, when_auto=device.type == "cuda" and not sharded)


@contextlib.contextmanager
def process_group(timeout_s: float = 1800.0, backend_setting: str = "auto") -> Iterator[DistEnv]:
    """Join torchrun's process group (NCCL and gloo on CUDA, gloo on CPU or with
    backend_setting=gloo) and always leave it. A collective that waits longer than timeout_s
    for a peer fails instead of hanging."""
    rank, local_rank, world_size = read_env()
    share_gpus = backend_setting == "gloo"
    device = select_device(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), share_gpus)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device, backend_setting)
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "MASTER_ADDR" in os.environ
    started_here = False
    if under_torchrun and not dist.is_initialized():
        # device_id binds NCCL's communicator to this GPU (created at once); gloo takes none.
        kwargs = {"device_id": device} if "nccl" in backend else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # After a torchrun restart the agent's store still holds the dead attempt's gloo
            # addresses; a fresh namespace keeps the new workers from dialling them.
            agent = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, False, timeout=timeout
            )
            kwargs["store"] = dist.PrefixStore(f"dist_train/attempt_{restart}", agent)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
        started_here = True
    try:
        yield DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
        if started_here:
            # FSDP's states and DDP's reducers sit in reference cycles that hold the group;
            # freed here, while it lives, rather than by the garbage collector at exit, after
            # destroy_process_group (a gloo rank aborted there under load).
            gc.collect()
            # Leave together: gloo can abort a rank ("terminate called without an active
            # exception") whose peer tore its connections down while it was still working.
            dist.barrier()
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks in place (no-op single-process); returns the tensor for chaining."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics)."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank 0's parameters and buffers (before wrapping: FSDP2, unlike DDP,
    does not broadcast them, and shards whatever each rank holds)."""
    if dist.is_initialized():
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=src)


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group)


def broadcast_object(obj: object, src: int = 0, group=None) -> object:
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def all_gather_objects(obj: object, group=None) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank (of `group`, default: all)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def is_timeout(exc: BaseException | str) -> bool:
    """Whether a backend error is a collective that gave up waiting (gloo and NCCL wording)."""
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def unresponsive_ranks(group, timeout_s: float) -> list[int] | None:
    """After a timeout: the ranks that do not reach a barrier on a healthy gloo `group` within
    timeout_s. Known on rank 0 only (None elsewhere, or where the barrier cannot tell)."""
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        found = re.search(r"[Rr]anks? ([\d, ]+) failed to pass", str(exc))
        return [int(r) for r in found.group(1).replace(",", " ").split()] if found else None
    return [] if dist.get_rank(group) == 0 else None


def on_rank0(env: DistEnv, decide, share: bool = True):
    """Run `decide` on rank 0 only; every rank learns whether it failed, so none is left waiting
    in a collective. With share=True every rank also gets its result; otherwise others get None."""
    outcome: tuple[str, Any] = ("ok", None)
    failure: BaseException | None = None
    if env.is_main:
        try:
            value = decide()
            outcome = ("ok", value if share else None)
        except Exception as exc:  # noqa: BLE001 - re-raised below on rank 0, reported on the others
            failure = exc
            outcome = ("error", str(exc) if isinstance(exc, UserError) else f"rank 0 failed: {exc!r}")
    kind, shared = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if kind == "error":
        raise UserError(shared)
    return value if env.is_main and not share else shared
