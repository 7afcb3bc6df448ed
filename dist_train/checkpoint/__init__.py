"""Checkpoints on disk: atomic, verifiable, resharded to any world size.

Layout of one checkpoint, `checkpoints/step_00000100/`:
  model_optim/     model and optimizer through torch.distributed.checkpoint (DCP): every rank
                   writes its own shards (FSDP) or its share of the replicated tensors (DDP),
                   keyed by parameter name, so any world size and strategy can load them
  train_state.pt   the run's declared train state (train/checkpointer.py) and its record (rank 0)
  rng_rank{r}.pt   python / numpy / torch / CUDA RNG states of rank r
  manifest.json    format version, step, size and sha256 of every file, written last

The files, read top-down:
  manifest.py    where checkpoints are, the manifest, verification, `resume: auto|never|PATH`
  store.py       writing and reading their contents (DCP, train state, RNG), the atomic save
  async_save.py  checkpoint.async_save: the same save with its writing in the background
  export.py      a checkpoint's weights as one safetensors file; which checkpoint a tool reads

`from dist_train import checkpoint` gives manifest's and store's functions by name.
"""

from typing import Any

from dist_train.checkpoint.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    MODEL_OPTIM,
    STEP_DIR,
    TRAIN_STATE,
    CheckpointError,
    hash_files,
    latest_valid,
    list_checkpoints,
    partial_dir,
    resolve_resume,
    set_aside_newer,
    step_dir,
    step_of,
    verify,
)

# store.py's names load torch.distributed.checkpoint (and DTensor, sympy: about a second) when
# first used, not on import: the launcher and the CLI only find and verify checkpoints.
_STORE = frozenset({
    "EMA", "begin", "dcp_state", "finish", "load_model", "load_model_and_optimizer", "load_rng_state",
    "load_train_state", "quiet_dcp", "read_full_state", "read_weights", "rng_state", "save", "saved_names",
    "set_rng_state", "write_small_files",
})  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _STORE:
        from dist_train.checkpoint import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EMA", "FORMAT_VERSION", "MANIFEST", "MODEL_OPTIM", "STEP_DIR", "TRAIN_STATE", "CheckpointError",
    "begin", "dcp_state", "finish", "hash_files", "latest_valid", "list_checkpoints", "load_model",
    "load_model_and_optimizer", "load_rng_state", "load_train_state", "partial_dir", "quiet_dcp",
    "read_full_state", "read_weights", "resolve_resume", "rng_state", "save", "saved_names",
    "set_aside_newer", "set_rng_state", "step_dir", "step_of", "verify", "write_small_files",
]  # fmt: skip
