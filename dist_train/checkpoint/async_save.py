"""Asynchronous checkpoints (`checkpoint.async_save: true`): training stalls only while the
state is copied to host memory; DCP writes it and every rank hashes its share in a background
thread while training goes on.

The safety of a synchronous save is kept (store.py): files go to `step_N.partial/`, and
the manifest and the rename that make the checkpoint visible to `resume: auto` happen only at
the next checkpoint boundary, after every rank's background write finished. At most one save
is in flight: the next one waits for it, which also keeps the staging buffers (reused between
saves) from being overwritten while they are written. The final save, and the save on a stop
signal, drain the one in flight and then save synchronously. A failed background write is
reported in one line and fails the run at that boundary; its `.partial` directory is never
picked by resume.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from dist_train import checkpoint
from dist_train.distributed import DistEnv, all_gather_objects

# Test hook: the background write of this step raises, as a full disk would.
FAIL_WRITE_AT_STEP = "DIST_TRAIN_FAIL_ASYNC_WRITE_AT_STEP"
# Test hook and override: the host memory (GiB) staging may use, instead of MemAvailable.
HOST_MEMORY_GB = "DIST_TRAIN_HOST_MEMORY_GB"


@dataclass
class _InFlight:
    checkpoint_root: Path
    step: int
    keep_last: int
    also_keep: frozenset[int]
    hashed: Future  # this rank's write, then the manifest entries (hashed over the checkpoint group)
    stager: Any = None  # this save's own stager, closed once it is written (where one cannot be reused)


class AsyncCheckpointer:
    """One per run, on every rank. `save` stages and returns; `drain` finishes what is in flight."""

    def __init__(self, env: DistEnv, timeout_s: float, message: Callable[[str], None]) -> None:
        self.env, self.message = env, message
        # DCP's background write and the hashing run their own collectives: on a gloo group of
        # their own, never interleaved with training's collectives on the default group (and
        # async_save needs a CPU backend even where training uses NCCL).
        self.group = (
            dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
            if dist.is_initialized()
            else None
        )
        if self.group is None:
            # One process: DCP's write in its own thread warns that it assumes so, past the
            # reach of a catch_warnings around the call; that is intended, for the whole run.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        # torch 2.11 and 2.12 clear a stager's copy table after each save, so its second save
        # fails (KeyError: <class 'type'>): there each save stages through a stager of its own.
        self.stager = _pinned_stager() if _stager_reusable() else None
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist_train_checkpoint")
        self.in_flight: _InFlight | None = None
        self.fits: bool | None = None  # whether the staging copy fits in host memory, decided at the first save

    def save(
        self,
        checkpoint_root: Path,
        step: int,
        train_state: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        keep_last: int,
        also_keep: frozenset[int] = frozenset(),
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Collective. Finishes the previous save, stages this one and starts writing it;
        returns where the checkpoint will be once the next boundary finishes it."""
        self.drain()
        state = checkpoint.dcp_state(model, optimizer, tensors)
        if self.fits is None:
            self.fits = self._fits_in_host_memory(state)
        if not self.fits:
            return checkpoint.save(
                checkpoint_root, step, train_state, model, optimizer, self.env, keep_last, also_keep, tensors
            )
        partial = checkpoint.begin(checkpoint_root, step, self.env)
        checkpoint.write_small_files(partial, train_state, self.env)  # small, and taken at this step
        own_stager = None if self.stager is not None else _pinned_stager()
        with checkpoint.quiet_dcp():
            # The copy to host memory happens inside this call, before it returns: BatchNorm's
            # buffers and the weights the next step changes are saved as they are now.
            stager = own_stager or self.stager
            kwargs = {} if stager is None else {"async_stager": stager}
            written = dcp.async_save(
                state, checkpoint_id=partial / checkpoint.MODEL_OPTIM, process_group=self.group, **kwargs
            )
        hashed = self.background.submit(self._finish_in_background, written, partial, step)
        self.in_flight = _InFlight(checkpoint_root, step, keep_last, also_keep, hashed, own_stager)
        return checkpoint.step_dir(checkpoint_root, step)

    def _finish_in_background(self, written: Future, partial: Path, step: int) -> dict[str, Any]:
        error = None
        try:
            written.result()
            if os.environ.get(FAIL_WRITE_AT_STEP) == str(step):
                raise OSError(28, "No space left on device (injected by the test hook)")
        except Exception as exc:  # noqa: BLE001 - agreed on below, reported in one line
            error = _one_line(exc)
        # Also the barrier before hashing: every rank's files are complete once all have answered.
        failed = [(rank, e) for rank, e in enumerate(all_gather_objects(error, self.group)) if e is not None]
        if failed:
            raise OSError(f"rank {failed[0][0]}: {failed[0][1]}")
        return checkpoint.hash_files(partial, self.env, self.group)

    def drain(self) -> Path | None:
        """Collective: wait for the save in flight and make it visible (manifest, rename)."""
        if self.in_flight is None:
            return None
        flight, self.in_flight = self.in_flight, None
        try:
            files, error = flight.hashed.result(), None
        except Exception as exc:  # noqa: BLE001 - reported in one line, on every rank
            files, error = None, _one_line(exc)
        finally:
            _close(flight.stager)
        errors = [e for e in all_gather_objects(error) if e is not None]
        if errors:
            partial = checkpoint.partial_dir(flight.checkpoint_root, flight.step)
            raise checkpoint.CheckpointError(
                f"the background write of checkpoint step {flight.step} failed ({errors[0]}); "
                f"{partial} is incomplete and never resumed from"
            )
        root, step = flight.checkpoint_root, flight.step
        return checkpoint.finish(root, step, self.env, flight.keep_last, files, also_keep=flight.also_keep)

    def close(self) -> None:
        """Not collective (also on an error path): wait for the write in flight without making
        it visible, so no thread writes while the process group goes away."""
        if self.in_flight is not None:
            try:
                self.in_flight.hashed.result()
            except Exception:  # noqa: BLE001 - the run is failing for another reason already
                pass
            _close(self.in_flight.stager)
            self.in_flight = None
        self.background.shutdown(wait=True)
        _close(self.stager)

    def _fits_in_host_memory(self, state: dict[str, Any]) -> bool:
        """Collective: all ranks stage, or all save synchronously (their collectives differ)."""
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        needed = _local_bytes(state) * local_ranks
        available = _available_host_bytes()
        if any(all_gather_objects(needed > 0.8 * available, self.group)):
            self.message(
                f"checkpoint.async_save: staging {needed / 2**30:.2f} GiB ({local_ranks} rank(s) on this node) "
                f"does not fit in 80% of the {available / 2**30:.2f} GiB of available host memory; "
                "saving synchronously"
            )
            return False
        return True


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _local_bytes(state: Any) -> int:
    """Bytes of this rank's tensors in a state dict (a DTensor's local shard only)."""
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_local_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def _available_host_bytes() -> float:
    if HOST_MEMORY_GB in os.environ:
        return float(os.environ[HOST_MEMORY_GB]) * 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")  # not Linux: no way to tell, stage as asked


def _pinned_stager():
    """DCP's stager with pinned host buffers where CUDA copies into them (faster, and reused
    between saves where the stager can be); None before torch 2.9, where async_save takes no
    stager and its own staging copies to host memory."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return None
    # By keyword: the options are a dataclass whose fields a release may add to or reorder.
    options = StagingOptions(
        use_pinned_memory=torch.cuda.is_available(),
        use_shared_memory=False,
        use_async_staging=False,  # then async_save returns a plain Future, staged before it returns
        use_non_blocking_copy=False,
    )
    return DefaultStager(options)


def _stager_reusable() -> bool:
    """Whether one stager stages twice: a throwaway one (no pinned memory) tries it on a state
    with the kinds of values an optimizer's state holds (tensors, floats, tuples)."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:  # before torch 2.9: no stagers at all
        return False

    probe = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                         use_async_staging=False, use_non_blocking_copy=False))  # fmt: skip
    try:
        for _ in range(2):
            probe.stage({"tensor": torch.zeros(1), "lr": 0.1, "betas": (0.9, 0.99)})
        return True
    except Exception:  # noqa: BLE001 - any failure means: do not reuse
        return False
    finally:
        probe.close()


def _close(stager) -> None:
    if stager is not None:
        stager.close()
