"""The Python API: `dist_train.fit(...)` from a user's own script, under torchrun or alone.

    # my_train.py, started with `torchrun --nproc-per-node 8 my_train.py` (or plain `python`)
    import dist_train
    model, train_set, val_set = ...  # built in Python, the same on every rank
    dist_train.fit("configs/digits.yaml", model=model, train_data=train_set, val_data=val_set)

The CLI's `dist-train train` is this function with a YAML path and no objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from dist_train.config import Config, ConfigError, load_config
from dist_train.tasks import LossFn


def fit(
    config: str | Path | dict[str, Any] | Config | None = None,
    overrides: list[str] = (),
    *,
    model: nn.Module | None = None,
    train_data: Dataset | None = None,
    val_data: Dataset | None = None,
    loss: LossFn | None = None,
    callbacks: list[Any] = (),
):
    """Train (or resume) a run, in this process as one rank of torchrun's group or alone.

        `config` is a YAML path, a mapping of the same sections, or a Config; `overrides` are
        `key=value` strings as on the command line. Objects win over the names in the config:
        `model` over model.name (every rank builds its own; rank 0's weights are given to all),
        `train_data`/`val_data` (map-style datasets, both or neither) over data.dataset, and
        `loss(outputs, targets) -> mean over the batch` over train.loss. `callbacks` are the user's
    components (any of the hooks in dist_train.components.Component), called after the config's
    `callbacks`, their `state_dict()` checkpointed. Checkpoints and resume
        behave exactly as from the CLI: the same call continues a stopped run.

        Returns a TrainResult (final step, last validation metrics, checkpoint). Mistakes in what
        was asked raise dist_train.config.UserError with a one-line message.
    """
    from dist_train.train.assembly import UserParts
    from dist_train.train.trainer import train

    cfg = load_config(config, list(overrides))
    if (train_data is None) != (val_data is None):
        raise ConfigError("dist_train.fit needs train_data and val_data together (or neither, for data.dataset)")
    datasets = None
    if train_data is not None:
        from dist_train.data import datasets_from_objects

        datasets = datasets_from_objects(
            train_data, val_data, cfg.data.num_classes, cfg.data.input_shape, "dist_train.fit"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"dist_train.fit: model must be a torch.nn.Module, got {type(model).__name__}")
    if loss is not None and not callable(loss):
        raise ConfigError(f"dist_train.fit: loss must be callable as loss(outputs, targets), got {loss!r}")
    return train(cfg, UserParts(model=model, datasets=datasets, loss=loss, callbacks=list(callbacks)))
