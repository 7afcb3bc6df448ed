"""Writing and reading a checkpoint's contents: model and optimizer (and more named tensors)
through torch.distributed.checkpoint, the train state, every rank's RNG; the atomic
partial-then-rename protocol of a save. Where checkpoints are and whether they are whole is
manifest.py's."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from dist_train.checkpoint.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    MODEL_OPTIM,
    TRAIN_STATE,
    CheckpointError,
    fsync_dir,
    hash_files,
    list_checkpoints,
    partial_dir,
    step_dir,
    step_of,
    write_durably,
)
from dist_train.distributed import DistEnv, barrier

# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This rank's own GPU only: a resume on a node with another GPU count still loads it.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    # Without a process group DCP warns that it assumes a single process: that is intended.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save(
    checkpoint_root: Path,
    step: int,
    train_state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    env: DistEnv,
    keep_last: int,
    also_keep: frozenset[int] = frozenset(),
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Collective: every rank calls it. All ranks write model and optimizer shards through DCP
    and their RNG; rank 0 writes the train state and the manifest, then renames. Older
    checkpoints beyond the newest `keep_last` are deleted unless their step is in `also_keep`.
    `tensors`: more sharded state beside the model's, saved through DCP under its own names
    (train.ema's weights under "ema")."""
    partial = begin(checkpoint_root, step, env)
    with quiet_dcp():
        dcp.save(dcp_state(model, optimizer, tensors), checkpoint_id=partial / MODEL_OPTIM)
    write_small_files(partial, train_state, env)
    return finish(checkpoint_root, step, env, keep_last, also_keep=also_keep)


def dcp_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, dict[str, torch.Tensor]] | None = None
) -> dict[str, Any]:
    """What DCP writes: the model's and optimizer's state (sharded under FSDP, full otherwise)
    and any more named tensors."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state, **(tensors or {})}


def begin(checkpoint_root: Path, step: int, env: DistEnv) -> Path:
    """Collective: an empty step_N.partial/ that every rank then writes into."""
    partial = partial_dir(checkpoint_root, step)
    if env.is_main:
        if partial.exists():
            shutil.rmtree(partial)  # left by an earlier crash
        partial.mkdir(parents=True)
    barrier()
    return partial


def write_small_files(partial: Path, train_state: dict[str, Any], env: DistEnv) -> None:
    """This rank's RNG and, on rank 0, the train state: taken at the step being saved."""
    write_durably(partial / f"rng_rank{env.rank}.pt", lambda f: torch.save(rng_state(), f))
    if env.is_main:
        write_durably(partial / TRAIN_STATE, lambda f: torch.save(train_state, f))


def finish(
    checkpoint_root: Path,
    step: int,
    env: DistEnv,
    keep_last: int,
    files: dict[str, Any] | None = None,
    also_keep: frozenset[int] = frozenset(),
) -> Path:
    """Collective, once every rank's files are in step_N.partial/: the manifest last, then the
    rename that makes the checkpoint visible to resume, then the oldest ones beyond keep_last go
    (but for the steps in `also_keep`, checkpoint.keep_best's).
    `files`: the manifest's entries when already hashed (an asynchronous save hashes in the background)."""
    final, partial = step_dir(checkpoint_root, step), partial_dir(checkpoint_root, step)
    if files is None:
        barrier()
        files = hash_files(partial, env)
    if env.is_main:
        manifest = {"format_version": FORMAT_VERSION, "step": step, "world_size": env.world_size, "files": files}
        write_durably(partial / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        if final.exists():
            # Only when training was restarted from an older checkpoint: the new one wins.
            stale = final.with_name(final.name + ".stale")
            if stale.exists():
                shutil.rmtree(stale)  # left by a crash between the two renames below
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale)
        else:
            os.replace(partial, final)
        fsync_dir(checkpoint_root)
        for old in list_checkpoints(checkpoint_root)[:-keep_last]:
            if step_of(old) not in also_keep:
                shutil.rmtree(old)
    barrier()
    return final


def load_train_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: one line, not a traceback
        raise CheckpointError(f"cannot read {path / TRAIN_STATE}: {exc}") from None


def load_rng_state(path: Path, rank: int) -> dict[str, Any]:
    file = path / f"rng_rank{rank}.pt"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no RNG state for rank {rank}")
    return torch.load(file, map_location="cpu", weights_only=True)


def _saved_tensors(path: Path) -> dict[str, TensorStorageMetadata]:
    try:
        metadata = dcp.FileSystemReader(str(path / MODEL_OPTIM)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a foreign or torn directory: one line
        raise CheckpointError(f"cannot read {path / MODEL_OPTIM}: {exc}") from None
    return {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def _check_fits(model_state: dict[str, torch.Tensor], saved: dict[str, TensorStorageMetadata], source: Path) -> None:
    """Name the first mismatching parameter instead of DCP's wall of text."""
    saved_shapes = {k.removeprefix("model."): tuple(m.size) for k, m in saved.items() if k.startswith("model.")}
    for name, tensor in model_state.items():
        if name not in saved_shapes:
            raise CheckpointError(f"checkpoint {source} does not fit this model: parameter {name} is missing")
        if saved_shapes[name] != tuple(tensor.shape):  # a DTensor's shape is the global one
            raise CheckpointError(
                f"checkpoint {source} does not fit this model: {name} has shape "
                f"{saved_shapes[name]} in the checkpoint, {tuple(tensor.shape)} in the model"
            )
    extra = [name for name in saved_shapes if name not in model_state]
    if extra:
        raise CheckpointError(f"checkpoint {source} does not fit this model: unexpected parameter {extra[0]}")


def load_model_and_optimizer(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> set[str]:
    """Collective: DCP reads the slices this rank owns, whatever world size wrote them. Each
    of `tensors` the checkpoint holds is loaded in place; returns the names of those it held."""
    model_state, optim_state = get_state_dict(model, optimizer)
    held = {name for name in tensors or {} if saved_names(path, name)}
    extra = {name: group for name, group in (tensors or {}).items() if name in held}
    state = _load_dcp(path, {"model": model_state, "optim": optim_state, **extra})
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return held


def load_model(path: Path, model: nn.Module) -> None:
    """Collective: the run's weights alone, for evaluation and compression (the optimizer state
    is not read): the EMA of the parameters where train.ema kept one, else the model's."""
    model_state = get_model_state_dict(model)
    state = _load_dcp(path, {"model": model_state})
    averaged = saved_names(path, EMA)
    if averaged:  # read into the model's own tensors: buffers stay the model's
        with quiet_dcp():
            dcp.load({EMA: {name: state["model"][name] for name in averaged}}, checkpoint_id=path / MODEL_OPTIM)
    set_model_state_dict(model, state["model"])


EMA = "ema"  # train.ema's average of the parameters, beside the model in DCP


def saved_names(path: Path, group: str) -> list[str]:
    """The names of the tensors a checkpoint holds under `group` (model, optim, ema)."""
    return [key.removeprefix(group + ".") for key in _saved_tensors(path) if key.startswith(group + ".")]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The run's weights, whole, with no process group (export, model.init_from): the model's
    state with train.ema's average over its parameters where one was kept."""
    return {**read_full_state(path, "model"), **read_full_state(path, EMA)}


def _load_dcp(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    _check_fits(state["model"], _saved_tensors(path), path)
    with quiet_dcp():
        dcp.load(state, checkpoint_id=path / MODEL_OPTIM)  # keys absent from `state` are not read
    return state


def read_full_state(path: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Whole tensors under `prefix` (model, optim) as one process sees them, assembled from
    every rank's shards; for export and inspection, needs no process group."""
    wanted = {
        key: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for key, m in _saved_tensors(path).items()
        if key.startswith(prefix + ".")
    }
    with quiet_dcp():
        dcp.load(wanted, checkpoint_id=path / MODEL_OPTIM, no_dist=True)
    return {key.removeprefix(prefix + "."): tensor for key, tensor in wanted.items()}
