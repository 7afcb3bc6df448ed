"""Range and cross-field checks of a built Config, each failure one line naming its key; and
the users' own objects that config keys name (`package.module:attribute`)."""

from __future__ import annotations

import os
import sys
from typing import Any

from dist_train.config.schema import DATASETS, LOGGED_METRICS, LOSSES, METRICS, PREEMPT_SIGNALS, Config
from dist_train.errors import ConfigError

FLOAT32_MAX = 3.4028234663852886e38


def is_import_path(name: str) -> bool:
    """`package.module:attribute`, how users name their own factories and functions."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr)


def import_object(path: str, key: str) -> Any:
    """The callable `package.module:attribute` that config key `key` names, or one line why not."""
    import importlib

    _put_cwd_on_path()
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError, TypeError) as exc:
        raise ConfigError(f"{key}={path}: cannot import {module_name} ({exc})") from None
    found = getattr(module, attr, None)
    if not callable(found):
        raise ConfigError(f"{key}={path}: {module_name} has no callable {attr!r}")
    return found


def _put_cwd_on_path() -> None:
    """Make modules in the current directory importable, as `python -m` does.

    `python -m dist_train.cli` and torchrun's `-m` workers start with the current directory on
    sys.path; the `dist-train` console script starts with its own bin/ folder instead, so
    `examples.my_dataset:shapes` would import under one and not the other. First, as `python
    -m` puts it: a module in the current directory wins over an installed one of that name.
    """
    cwd = os.getcwd()
    if not any(entry == "" or os.path.abspath(entry) == cwd for entry in sys.path):
        sys.path.insert(0, cwd)


def validate(cfg: Config) -> None:
    """Range and cross-field checks; each failure names its key."""

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key} {message}")

    require(0 <= cfg.run.seed < 2**31, "run.seed", f"must be in [0, 2**31), got {cfg.run.seed}")

    require(
        cfg.run.name not in ("", ".", "..") and "/" not in cfg.run.name,
        "run.name",
        f"must be a directory name without '/' (not '.' or '..'), got {cfg.run.name!r}",
    )
    require(
        cfg.data.dataset in DATASETS or is_import_path(cfg.data.dataset),
        "data.dataset",
        f"must be one of {', '.join(DATASETS)} or 'package.module:factory'; got {cfg.data.dataset!r}",
    )
    require(
        cfg.data.num_classes is None or cfg.data.num_classes >= 1,
        "data.num_classes",
        f"must be >= 1, got {cfg.data.num_classes}",
    )
    require(
        cfg.data.input_shape is None or (len(cfg.data.input_shape) >= 1 and min(cfg.data.input_shape) >= 1),
        "data.input_shape",
        f"must be a list of positive sizes, got {cfg.data.input_shape}",
    )
    require(
        cfg.data.batch_size == "auto" or cfg.data.batch_size >= 1,
        "data.batch_size",
        f"must be >= 1 or auto, got {cfg.data.batch_size}",
    )
    require(
        cfg.data.max_memory_gb is None or cfg.data.max_memory_gb > 0,
        "data.max_memory_gb",
        f"must be > 0, got {cfg.data.max_memory_gb}",
    )
    require(cfg.data.eval_batch_size >= 1, "data.eval_batch_size", f"must be >= 1, got {cfg.data.eval_batch_size}")
    require(cfg.data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {cfg.data.num_workers}")
    require(0 < cfg.data.val_fraction < 1, "data.val_fraction", f"must be between 0 and 1, got {cfg.data.val_fraction}")
    require(cfg.data.image_size >= 8, "data.image_size", f"must be >= 8, got {cfg.data.image_size}")
    require(
        len(cfg.data.synthetic_shape) == 3 and min(cfg.data.synthetic_shape) >= 1,
        "data.synthetic_shape",
        f"must be [channels, height, width] of positive sizes, got {cfg.data.synthetic_shape}",
    )
    require(cfg.data.synthetic_size >= 1, "data.synthetic_size", f"must be >= 1, got {cfg.data.synthetic_size}")
    require(
        cfg.data.synthetic_classes >= 2, "data.synthetic_classes", f"must be >= 2, got {cfg.data.synthetic_classes}"
    )
    require(cfg.data.seq_len >= 2, "data.seq_len", f"must be >= 2, got {cfg.data.seq_len}")
    require(cfg.model.n_layer >= 1, "model.n_layer", f"must be >= 1, got {cfg.model.n_layer}")
    require(cfg.model.n_head >= 1, "model.n_head", f"must be >= 1, got {cfg.model.n_head}")
    require(
        cfg.model.width >= 1 and cfg.model.width % cfg.model.n_head == 0,
        "model.width",
        f"must be a positive multiple of model.n_head={cfg.model.n_head}, got {cfg.model.width}",
    )
    require(0 <= cfg.model.dropout < 1, "model.dropout", f"must be in [0, 1), got {cfg.model.dropout}")
    require(
        all(h >= 1 for h in cfg.model.mlp_hidden), "model.mlp_hidden", f"sizes must be >= 1, got {cfg.model.mlp_hidden}"
    )

    require(0 < cfg.optim.lr <= FLOAT32_MAX, "optim.lr", f"must be > 0 and fit in float32, got {cfg.optim.lr}")
    require(cfg.optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {cfg.optim.weight_decay}")
    require(0 <= cfg.optim.momentum < 1, "optim.momentum", f"must be in [0, 1), got {cfg.optim.momentum}")
    require(not cfg.optim.nesterov or cfg.optim.momentum > 0, "optim.nesterov", "needs optim.momentum > 0")
    require(
        len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
        "optim.betas",
        f"must be two values in [0, 1), got {cfg.optim.betas}",
    )
    require(cfg.optim.eps > 0, "optim.eps", f"must be > 0, got {cfg.optim.eps}")
    for prefix, factor in cfg.optim.lr_multipliers.items():
        require(factor >= 0, f"optim.lr_multipliers.{prefix}", f"must be >= 0, got {factor}")
    require(
        cfg.model.init_from is None or bool(cfg.model.init_from.strip()),
        "model.init_from",
        "must be a safetensors file, a run directory or torchvision:Weights.NAME",
    )

    require(cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {cfg.schedule.warmup_steps}")
    require(
        0 <= cfg.schedule.min_lr_ratio <= 1,
        "schedule.min_lr_ratio",
        f"must be in [0, 1], got {cfg.schedule.min_lr_ratio}",
    )
    require(cfg.schedule.step_size >= 1, "schedule.step_size", f"must be >= 1, got {cfg.schedule.step_size}")
    require(0 < cfg.schedule.gamma <= 1, "schedule.gamma", f"must be in (0, 1], got {cfg.schedule.gamma}")

    t = cfg.train
    require(
        t.loss in LOSSES or is_import_path(t.loss),
        "train.loss",
        f"must be one of {', '.join(LOSSES)} or 'package.module:function'; got {t.loss!r}",
    )
    require(0 <= t.label_smoothing < 1, "train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    require(
        t.label_smoothing == 0 or t.loss == "cross_entropy",
        "train.label_smoothing",
        f"applies to train.loss=cross_entropy only, not {t.loss}",
    )
    for i, metric in enumerate(t.metrics or []):
        require(metric in METRICS, f"train.metrics[{i}]", f"must be one of {', '.join(METRICS)}; got {metric!r}")
    require(
        t.max_steps is not None or t.max_epochs is not None,
        "train.max_steps",
        "or train.max_epochs must be set (training needs an end)",
    )
    require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    require(t.max_epochs is None or t.max_epochs >= 1, "train.max_epochs", f"must be >= 1, got {t.max_epochs}")
    require(t.stop_at_step is None or t.stop_at_step >= 1, "train.stop_at_step", f"must be >= 1, got {t.stop_at_step}")
    require(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    require(t.global_batch is None or t.global_batch >= 1, "train.global_batch", f"must be >= 1, got {t.global_batch}")
    require(
        t.global_batch is None or t.grad_accum_steps == 1,
        "train.grad_accum_steps",
        f"is derived from train.global_batch={t.global_batch}; leave it at 1, got {t.grad_accum_steps}",
    )
    require(
        t.clip_grad_norm is None or t.clip_grad_norm > 0, "train.clip_grad_norm", f"must be > 0, got {t.clip_grad_norm}"
    )
    require(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    require(t.eval_batches is None or t.eval_batches >= 1, "train.eval_batches", f"must be >= 1, got {t.eval_batches}")
    require(
        cfg.checkpoint.preempt_signal in PREEMPT_SIGNALS,
        "checkpoint.preempt_signal",
        f"must be one of {', '.join(PREEMPT_SIGNALS)}, got {cfg.checkpoint.preempt_signal!r}",
    )
    require(
        cfg.parallel.collective_timeout_s > 0,
        "parallel.collective_timeout_s",
        f"must be > 0, got {cfg.parallel.collective_timeout_s}",
    )
    require(t.gc_every_steps >= 0, "train.gc_every_steps", f"must be >= 0, got {t.gc_every_steps}")
    stop, best, logged = t.early_stop, cfg.checkpoint.keep_best, ("val_loss", *LOGGED_METRICS.values())
    for key, metric in (("train.early_stop.metric", stop.metric), ("checkpoint.keep_best.metric", best.metric)):
        require(metric is None or metric in logged, key, f"must be one of {', '.join(logged)}; got {metric!r}")
    profile = cfg.logging.profile
    require(
        profile.start_step is None or profile.start_step >= 0,
        "logging.profile.start_step",
        f"must be >= 0, got {profile.start_step}",
    )
    require(profile.steps >= 1, "logging.profile.steps", f"must be >= 1, got {profile.steps}")
    require(
        all(rank >= 0 for rank in profile.ranks), "logging.profile.ranks", f"must be ranks >= 0, got {profile.ranks}"
    )
    require(best.k >= 1, "checkpoint.keep_best.k", f"must be >= 1, got {best.k}")
    every, eval_every = cfg.checkpoint.every_steps, t.eval_every
    require(
        best.metric is None or every == 0 or (eval_every > 0 and every % eval_every == 0),
        "checkpoint.keep_best",
        f"judges each checkpoint by the evaluation at its step: checkpoint.every_steps ({every}) must be "
        f"a multiple of train.eval_every ({eval_every})",
    )
    require(t.ema.decay is None or 0 < t.ema.decay < 1, "train.ema.decay", f"must be in (0, 1), got {t.ema.decay}")
    require(stop.patience >= 1, "train.early_stop.patience", f"must be >= 1, got {stop.patience}")
    require(stop.min_delta >= 0, "train.early_stop.min_delta", f"must be >= 0, got {stop.min_delta}")
    for index, spec in enumerate(cfg.callbacks):
        target = spec.get("target")
        require(
            isinstance(target, str) and is_import_path(target),
            f"callbacks[{index}].target",
            f"must name a class as 'package.module:Class'; got {target!r}",
        )
    require(
        not (t.deterministic and t.cudnn_benchmark is True),
        "train.cudnn_benchmark",
        "cannot be true with train.deterministic=true (the algorithm it picks may differ between runs); use auto",
    )
    require(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops", f"must be > 0, got {t.peak_tflops}")
    require(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    if cfg.schedule.name == "onecycle" and t.max_steps is not None:
        require(
            cfg.schedule.warmup_steps < t.max_steps, "schedule.warmup_steps", "must be < train.max_steps for onecycle"
        )

    require(
        not (t.channels_last is True and cfg.parallel.strategy == "fsdp"),
        "train.channels_last",
        "cannot be true with parallel.strategy=fsdp: FSDP2 shards only contiguous (NCHW) parameters; use auto",
    )
    require(
        not (t.precision == "fp16" and cfg.parallel.strategy == "fsdp"),
        "train.precision",
        "fp16 is not supported with parallel.strategy=fsdp; use bf16",
    )
    replicate = cfg.parallel.replicate_degree
    require(
        replicate == "auto" or replicate >= 1,
        "parallel.replicate_degree",
        f"must be >= 1 or auto, got {replicate}",
    )
    require(
        replicate == 1 or cfg.parallel.strategy == "fsdp",
        "parallel.replicate_degree",
        f"applies only to parallel.strategy=fsdp (HSDP); got {replicate} with {cfg.parallel.strategy}",
    )
    require(cfg.parallel.bucket_cap_mb > 0, "parallel.bucket_cap_mb", f"must be > 0, got {cfg.parallel.bucket_cap_mb}")
    require(
        cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {cfg.checkpoint.every_steps}"
    )
    require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {cfg.checkpoint.keep_last}")
    require(bool(cfg.checkpoint.resume), "checkpoint.resume", "must be auto, never or a checkpoint path")
    prune = cfg.prune
    require(
        prune.sparsity is None or 0 < prune.sparsity < 1, "prune.sparsity", f"must be in (0, 1), got {prune.sparsity}"
    )
    require(prune.start_step >= 0, "prune.start_step", f"must be >= 0, got {prune.start_step}")
    require(
        prune.end_step is None or prune.end_step > prune.start_step,
        "prune.end_step",
        f"must be > prune.start_step ({prune.start_step}), got {prune.end_step}",
    )


def check_device(cfg: Config, cuda_available: bool) -> None:
    """What the config asks of the machine, checked before any worker starts."""
    if cfg.train.precision == "fp16" and not cuda_available:
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (it relies on GradScaler); use bf16 on CPU")


def resolve_auto(setting: bool | str, when_auto: bool) -> bool:
    """A `true | false | auto` setting as a bool; `when_auto` is what auto means here."""
    return when_auto if setting == "auto" else bool(setting)
