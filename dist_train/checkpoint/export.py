"""`dist-train export RUN_DIR`: consolidated weights for inference, as one safetensors file.

DCP checkpoints record which slice of every tensor each rank wrote, so one process assembles
the full weights of any strategy and world size: export needs no process group and no GPUs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_train import checkpoint
from dist_train.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export(run_dir: Path, out: Path, step: int | None = None, dtype: str = "fp32") -> Path:
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = weights_checkpoint(run_dir, step)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory")
    state = checkpoint.read_weights(source)
    tensors, seen = {}, set()
    for name, tensor in state.items():
        # safetensors stores no aliases: tied weights (GPT's embedding and head) become copies.
        alias = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        tensor = tensor.clone() if alias in seen else tensor
        seen.add(alias)
        tensors[name] = tensor.to(DTYPES[dtype]).contiguous() if tensor.is_floating_point() else tensor.contiguous()
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file(tensors, str(partial), metadata={"source": str(source), "step": str(source.name), "dtype": dtype})
    partial.replace(out)  # never leave a half-written file under the requested name
    return source


def weights_checkpoint(path: Path, step: int | None = None) -> Path:
    """The verified checkpoint whose weights `path` stands for: a run directory's newest valid
    one (or its checkpoint of `step`), or `path` itself when it is a checkpoint directory.
    Export and model.init_from read their weights from it with checkpoint.read_weights."""
    if step is None and (path / checkpoint.MANIFEST).is_file():
        checkpoint.verify(path)
        return path
    root = path / "checkpoints"
    if step is None:
        source = checkpoint.latest_valid(root)
        if source is None:
            raise UserError(f"{path} has no valid checkpoint (neither a run directory with one nor a checkpoint)")
        return source
    source = checkpoint.step_dir(root, step)
    if not source.is_dir():
        raise UserError(f"{path} has no checkpoint for step {step}")
    checkpoint.verify(source)
    return source
