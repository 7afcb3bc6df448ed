"""`data.batch_size: auto` and `dist-train find-batch`: the largest micro-batch that fits, the same
on every rank.

A trial is one optimizer step of the real model (strategy, precision, fine-tuning as configured)
on real batches of one size: step.py's forward_backward and optimizer_step, as training steps. Sizes double from 1
until a trial fails or the training set's share per rank is reached, a binary search between the
last fit and the first failure finds the edge, and about 10% is given back as headroom (allocator
fragmentation, a longer sequence or a bigger image later).

A trial fails on a rank that runs out of memory (torch.OutOfMemoryError, which
torch.cuda.OutOfMemoryError is) or uses more than data.max_memory_gb. Its outcome is all-reduced
with MIN, so every rank takes the same decision and runs the same next trial: no rank is left
alone in a collective, which is how a search deadlocks when only some ranks run out (Composer's
automatic micro-batching). Under DDP a trial does not all-reduce its gradients, so a rank that
fails mid-step leaves no peer waiting inside backward. FSDP all-gathers inside forward: a rank
that fails there alone leaves its peers in that all-gather until parallel.collective_timeout_s.

Memory per rank: on CUDA, the peak allocated during the trial. A CPU does not run out before the
OS kills the process, and its allocator keeps no statistics, so there data.max_memory_gb caps an
estimate: this rank's parameters, gradients and optimizer state plus every tensor autograd keeps
for backward (seen through saved-tensor hooks, each storage once). Temporaries that forward and
backward free as they go are not in it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dist_train.config import Config, UserError
from dist_train.data import Batch, Datasets, build_pipeline
from dist_train.data.batch import check_global_batch, split_global_batch
from dist_train.data.loader import load_datasets
from dist_train.distributed import DistEnv, all_reduce_max, all_reduce_min
from dist_train.efficiency import local_shard, param_and_optimizer_bytes
from dist_train.parallel import Strategy
from dist_train.tasks import LossFn
from dist_train.train.assembly import Run, UserParts, assemble, fixed_lr
from dist_train.train.step import forward_backward, optimizer_step

# For tests only: a trial of a micro-batch larger than this raises torch.OutOfMemoryError in the
# model's forward, on the ranks DIST_TRAIN_OOM_RANK lists (comma-separated; unset: every rank),
# or with DIST_TRAIN_OOM_AS=cublas the RuntimeError cuBLAS gives when its workspace allocation
# fails. It gives a CPU, which never runs out, an out-of-memory edge at a known size.
OOM_ABOVE_ENV = "DIST_TRAIN_OOM_ABOVE"
OOM_RANK_ENV = "DIST_TRAIN_OOM_RANK"
OOM_AS_ENV = "DIST_TRAIN_OOM_AS"

HEADROOM = 0.9  # of the largest micro-batch that fitted, when memory (not the data) bounded it


class BatchSearchError(UserError):
    pass


@dataclass
class Trial:
    size: int
    fits: list[bool]  # per rank
    used_gb: float | None  # the fullest rank's memory, where measured

    @property
    def ok(self) -> bool:
        return all(self.fits)


@dataclass
class BatchSearch:
    micro_batch: int  # what to train with
    largest_fit: int
    first_failure: int | None  # None: the data, not memory, bounded the search
    bound: int  # the largest size tried: the training set's share per rank, or train.global_batch's
    bound_by: str
    trials: list[Trial]
    max_memory_gb: float | None

    def summary(self) -> str:
        if self.first_failure is None:
            why = f"every size up to {self.bound}, {self.bound_by}, fits"
        else:
            why = f"{self.largest_fit} fits, {self.first_failure} does not, less ~10% headroom"
        return f"micro-batch {self.micro_batch} per rank ({why}; {len(self.trials)} trials)"

    def table(self) -> list[str]:
        lines = ["   size  result"]
        for trial in self.trials:
            if trial.ok:
                result = "fits"
            else:
                failed = [str(rank) for rank, fits in enumerate(trial.fits) if not fits]
                result = f"does not fit on rank {', '.join(failed)}"
            if trial.used_gb is not None:
                result += f" ({trial.used_gb:.3g} GiB)"
            lines.append(f"{trial.size:>7}  {result}")
        return lines


def search(
    cfg: Config,
    env: DistEnv,
    strategy: Strategy,
    datasets: Datasets | None = None,
    user_model: nn.Module | None = None,
    loss: LossFn | None = None,
) -> BatchSearch:
    """The largest micro-batch per rank that fits, agreed by every rank (call it on all)."""
    check_global_batch(cfg, env.world_size)  # before any trial
    if datasets is None:
        datasets = load_datasets(cfg.data, env)
    bound, bound_by = len(datasets.train) // env.world_size, "the training set per rank"
    if cfg.train.global_batch is not None and cfg.train.global_batch // env.world_size < bound:
        bound, bound_by = cfg.train.global_batch // env.world_size, "train.global_batch per rank"

    def pipeline(size: int):
        # One micro-batch per step: accumulation adds no memory beyond the gradients a step has anyway.
        return build_pipeline(cfg.data, env, Batch(env.world_size, size, 1), cfg.run.seed, datasets)

    cap = None if cfg.data.max_memory_gb is None else cfg.data.max_memory_gb * 2**30
    # What the trials step: the configured model, wrapped, with its optimizer, at lr x 1 (the
    # pipeline of one sample also gives the one-line errors of a dataset too small for even that).
    # The user's model object is trained on later: the trials step a copy. resuming=True: the
    # weights do not matter here, so model.init_from is not read.
    model = None if user_model is None else copy.deepcopy(user_model)
    trial_parts = UserParts(model=model, datasets=datasets, loss=loss)
    trial_run = assemble(
        cfg, env, strategy, Batch(env.world_size, 1, 1), parts=trial_parts, lr_factor=fixed_lr, resuming=True
    )
    trials: list[Trial] = []

    def attempt(size: int) -> bool:
        fits, used = _trial(dataclasses.replace(trial_run, data=pipeline(size)), size, cap)
        # One MIN all-reduce gives every rank every rank's outcome: slot r is rank r's, the rest 1.
        outcome = torch.ones(env.world_size, device=env.device)
        outcome[env.rank] = float(fits)
        fits_on = [bool(v) for v in all_reduce_min(outcome).tolist()]
        most = all_reduce_max(torch.tensor(-1.0 if used is None else used / 2**30, device=env.device)).item()
        trials.append(Trial(size, fits_on, None if most < 0 else most))
        return trials[-1].ok

    try:
        fit, fail, size = 0, None, 1
        while size <= bound and attempt(size):
            fit, size = size, size * 2
        if size <= bound:
            fail = size  # the doubling stopped at a failure
        elif fit < bound:  # every power of two fitted: the bound itself
            fit, fail = (bound, None) if attempt(bound) else (fit, bound)
        while fail is not None and fail - fit > 1:
            middle = (fit + fail) // 2
            fit, fail = (middle, fail) if attempt(middle) else (fit, middle)
    finally:
        # The trial model, its optimizer state and wrappers go before the real model is built,
        # whether the search ended or failed: the run trains in the memory they held.
        trial_run = None
        release_memory(env.device, compiled=cfg.train.compile)
    if fit == 0:
        limit = f"data.max_memory_gb={cfg.data.max_memory_gb}" if cap is not None else "out of memory"
        ranks = ", ".join(str(r) for r, ok in enumerate(trials[0].fits) if not ok)
        raise BatchSearchError(f"data.batch_size=auto: not even a micro-batch of 1 fits on rank {ranks} ({limit})")
    chosen = fit if fail is None else max(1, int(fit * HEADROOM))
    return BatchSearch(chosen, fit, fail, bound, bound_by, trials, cfg.data.max_memory_gb)


def release_memory(device: torch.device, compiled: bool = False) -> None:
    """Free what dropped objects still hold: FSDP's states and DDP's reducer sit in reference
    cycles that only a collection breaks, the CUDA allocator then hands its cached blocks back
    to the device, and torch.compile's caches drop the graphs specialised on the trial model."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _trial(run: Run, size: int, cap: float | None) -> tuple[bool, float | None]:
    """Whether one optimizer step at this micro-batch fits on this rank, and the bytes it used
    where measured (CUDA; on a CPU the estimate, when there is a cap to compare it with)."""
    device = run.env.device
    estimate = cap is not None and device.type != "cuda"
    fits, used, ooms_before = True, None, _allocator_ooms(device)
    try:
        with _injected_oom(run, size), _SavedForBackward(run.model) if estimate else contextlib.nullcontext() as kept:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # sync=False under DDP: no gradient all-reduce that a failed rank would never join.
            step_loss, _ = forward_backward(run, run.autocast(), sync=run.strategy.name == "fsdp")
            optimizer_step(run, run.trained_params, step_loss, measure_norm=False, skip_nonfinite=False)
        if device.type == "cuda":
            used = float(torch.cuda.max_memory_allocated(device))
        elif estimate:
            trainable = sum(local_shard(p.detach()).nbytes for p in run.model.parameters() if p.requires_grad)
            used = float(kept.bytes + param_and_optimizer_bytes(run.model, run.optimizer) + trainable)  # + gradients
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc, allocator_ran_out=_allocator_ooms(device) > ooms_before):
            raise
        fits = False
    run.strategy.zero_grad(run.optimizer)
    if not fits:
        # What the failed step held (activations, referenced from its traceback's frames) is
        # freed by a full collection; the CUDA allocator then gives its cached blocks back.
        release_memory(device)
    return fits and (cap is None or used is None or used <= cap), used


# How CUDA libraries word a failed allocation of their own: a RuntimeError, not torch's
# OutOfMemoryError, reaches Python ("CUDA error: out of memory" from a raw cudaMalloc,
# CUBLAS_STATUS_ALLOC_FAILED from cublasCreate, cuDNN 9's ..._DEVICE_ALLOCATION_FAILED and
# ..._HOST_ALLOCATION_FAILED, CUDNN_STATUS_ALLOC_FAILED before it).
OUT_OF_MEMORY_WORDS = ("out of memory", "ALLOC_FAILED", "ALLOCATION_FAILED")


def is_out_of_memory(exc: BaseException, allocator_ran_out: bool = False) -> bool:
    """Whether a failed trial ran out of device memory (then the size does not fit) rather than
    failing for another reason (then the search stops with that error). cuDNN's convolutions
    catch the allocator's out-of-memory errors while they try smaller workspaces, then fail with
    "unable to find an engine", which other causes also give: that counts only where the
    allocator ran out during the trial. A collective's failure never counts (NCCL words a CUDA
    failure "out of memory" too, and the search must not go on over a broken communicator)."""
    if isinstance(exc, torch.distributed.DistError):
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return any(words in text for words in OUT_OF_MEMORY_WORDS) or (
        allocator_ran_out and "unable to find an engine" in text
    )


def _allocator_ooms(device: torch.device) -> int:
    """How many out-of-memory errors the CUDA caching allocator has raised in this process."""
    return torch.cuda.memory_stats(device).get("num_ooms", 0) if device.type == "cuda" else 0


class _SavedForBackward(contextlib.AbstractContextManager):
    """Bytes of the tensors autograd keeps for backward while it is entered, each storage
    counted once; parameters (counted as such) are left out."""

    def __init__(self, model: nn.Module) -> None:
        self.parameters = {_storage(p.detach()) for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = _storage(tensor)
        if storage not in self.parameters and storage not in self.seen:
            self.seen.add(storage)
            self.bytes += local_shard(tensor).untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> _SavedForBackward:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)


def _storage(tensor: torch.Tensor) -> int:
    return local_shard(tensor).untyped_storage().data_ptr()


@contextlib.contextmanager
def _injected_oom(run: Run, size: int) -> Iterator[None]:
    """The test hook (OOM_ABOVE_ENV): out of memory inside the model's forward above a size."""
    above, ranks = os.environ.get(OOM_ABOVE_ENV), os.environ.get(OOM_RANK_ENV)
    if above is None or size <= int(above) or (ranks is not None and str(run.env.rank) not in ranks.split(",")):
        yield
        return

    def out_of_memory(module: nn.Module, args: Any) -> None:
        injected = f"{OOM_ABOVE_ENV}={above}: injected for a micro-batch of {size}"
        if os.environ.get(OOM_AS_ENV) == "cublas":  # as torch's TORCH_CUDABLAS_CHECK words it
            raise RuntimeError(
                f"CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`; {injected}"
            )
        raise torch.OutOfMemoryError(injected)

    handle = run.strategy.unwrap(run.model).register_forward_pre_hook(out_of_memory)
    try:
        yield
    finally:
        handle.remove()


def resolve_batch(
    cfg: Config,
    env: DistEnv,
    strategy: Strategy,
    state: dict[str, Any] | None = None,
    parts: UserParts | None = None,
    datasets: Datasets | None = None,
) -> Batch:
    """The step's batch as the run trains it: data.batch_size, or for `auto` the micro-batch
    found now (or the one the checkpoint being resumed ran with); train.global_batch sets the
    accumulation. The config is left as the user wrote it."""
    micro, searched = cfg.data.batch_size, False
    if micro == "auto":
        recorded = None if state is None else state.get("micro_batch", state["config"]["data"]["batch_size"])
        if isinstance(recorded, int):  # exact resume: the search is not run again
            micro, line = recorded, f"micro-batch {recorded} per rank, kept from the checkpoint"
        else:
            given = parts or UserParts()
            found = search(cfg, env, strategy, datasets or given.datasets, given.model, given.loss)
            micro, line, searched = found.micro_batch, found.summary(), True
    batch = split_global_batch(cfg, env.world_size, micro, searched)
    if cfg.data.batch_size == "auto" and env.is_main:
        if searched and batch.micro != found.micro_batch:
            line += f"; {batch.micro} makes up train.global_batch={cfg.train.global_batch}"
        print(f"data.batch_size=auto: {line}", flush=True)
    return batch
