"""Process-wide settings a run makes once: the host allocator, CUDA's math modes,
deterministic algorithms, when the garbage collector runs, and the RNG seeds. Each says why;
none talks to other ranks (distributed.py does)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch

from dist_train.config import TrainConfig, UserError, resolve_auto

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
