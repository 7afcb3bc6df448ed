"""Process setup (process group from torchrun's environment, per-rank seeding, the host
allocator) and collectives helpers."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_train.config import TrainConfig, UserError, resolve_auto


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


# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for this setting on 64-bit builds
TRIM_THRESHOLD = 2**30


def retain_freed_host_memory() -> bool:
    """Make glibc keep freed memory for reuse rather than hand it back to the OS.

    By default glibc gives each large block its own mapping, unmapped on free, and trims the
    heap whenever its free top outgrows a threshold that it adapts as the program runs. A
    training step frees and allocates the same buffers every time, so on CPU a step can fault
    megabytes of fresh, kernel-zeroed pages back in: measured on the seed CNN, 0.1 to 1,400
    faults a step depending on the run, and up to 30% of its throughput. Now blocks up to
    32 MiB come from the heap and up to 1 GiB of free heap stays mapped: what a spike frees
    stays with the process until it exits. Returns False where the C library is not glibc
    (macOS, Windows, musl) or refuses a setting (32-bit glibc caps the first at 16 MiB).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mapped_ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mapped_ok)


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


def set_cuda_math(cfg: TrainConfig) -> None:
    """Process-wide CUDA math settings: TF32 tensor cores for fp32 matmuls and convolutions
    (PyTorch leaves them off for matmuls), and cuDNN's per-shape algorithm search (off with
    train.deterministic unless asked for, which the config refuses)."""
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = resolve_auto(cfg.cudnn_benchmark, when_auto=not cfg.deterministic)


# torch 2.6 to 2.9 refuse deterministic mode on CUDA unless cuBLAS's workspace is fixed by this
# setting (one of the two NVIDIA documents); 2.10 dropped the check, its workspaces being fixed
# per handle and stream. torch reads the size when it first sizes a workspace and may reuse the
# buffer at a new size later: it is set only before CUDA starts, never under a running context.
CUBLAS_DETERMINISTIC = ":4096:8"
CUBLAS_CHECKED = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 10)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """train.deterministic: every op's deterministic implementation (or an error naming the op
    that has none) and cuDNN's deterministic kernels while the block runs, with cuBLAS's
    workspace fixed where torch requires it; what was set before is restored after it
    (dist_train.fit may be one call of many)."""
    if not enabled:
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    set_workspace = CUBLAS_CHECKED and before[3] not in (":4096:8", ":16:8")
    if set_workspace and torch.cuda.is_initialized():
        raise UserError(
            "train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before CUDA "
            f"starts (torch {torch.__version__.split('+')[0]}); set it before starting Python"
        )
    if set_workspace:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic = before[2]
        if set_workspace and before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        elif set_workspace:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[3]


class ScheduledGC:
    """train.gc_every_steps: the garbage collector runs at the same steps on every rank. Python
    collects when allocations cross a threshold, which each rank reaches at its own moment; a
    rank paused there keeps the others waiting in the next collective, and with many ranks some
    rank is always collecting. So automatic collection is off inside the loop, one full
    collection clears what set-up left, and a young-generation collection (what the automatic
    one mostly is) runs every `every` steps; `every=0` leaves Python's collector as it is."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.was_enabled = gc.isenabled()

    def __enter__(self) -> ScheduledGC:
        if self.every:
            gc.disable()
            gc.collect()
        return self

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect(1)

    def __exit__(self, *exc: object) -> None:
        if self.every and self.was_enabled:
            gc.enable()


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
