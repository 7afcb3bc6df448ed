"""dist_train: a readable DDP training framework for torchrun, SLURM and a laptop CPU."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["fit", "load_config"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `dist-train launch` must not pay for (or import) the training code.
    if name == "fit":
        from dist_train.api import fit

        return fit
    if name == "load_config":
        from dist_train.config import load_config

        return load_config
    raise AttributeError(f"module 'dist_train' has no attribute {name!r}")
