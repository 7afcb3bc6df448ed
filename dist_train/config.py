"""Typed run configuration: dataclass schema -> YAML file -> `key=value` overrides.

Precedence is CLI > YAML > schema defaults. Every user mistake (unknown key, wrong
type, out-of-range value) raises ConfigError with one line that names the key, so a
typo never silently becomes a default.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, never a traceback."""


class ConfigError(UserError):
    pass


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    output_dir: str = "runs"
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    # digits | image_folder | cifar10 | mnist | synthetic | text | tokens, or "package.module:factory":
    # factory(cfg: DataConfig, **data.kwargs) returns the train and validation datasets
    # (map-style) and optionally the num_classes and input_shape the model needs (README).
    dataset: str = "digits"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments for a dataset factory
    # What the model is built for when the data cannot say (a user dataset that returns no
    # spec, or datasets passed to dist_train.fit): classes (or outputs), and one input's shape.
    num_classes: int | None = None
    input_shape: list[int] | None = None
    # A sample that cannot be read (corrupt file, decode error): false stops with one line
    # naming its index (and file); true replaces it with another sample chosen from its key,
    # the same on every run, counted and logged as bad_samples.
    skip_bad_samples: bool = False
    # Where image_folder/cifar10/mnist live; image_folder expects train/ (and optionally val/).
    root: str = "data"
    download: bool = False
    # Per rank, per micro-batch; auto: the largest that fits, searched at start-up (dist-train
    # find-batch) and recorded in the checkpoints, so a resumed run keeps it.
    batch_size: int | Literal["auto"] = 64
    # batch_size auto: the memory one trial may use per rank, in GiB (CUDA: peak allocated;
    # CPU, where nothing runs out: an estimate, see batch_finder). None: until out of memory.
    max_memory_gb: float | None = None
    eval_batch_size: int = 256
    num_workers: int = 0
    augment: bool = True
    # Fraction held out for validation: image_folder without a val/ folder, and text files.
    val_fraction: float = 0.2
    image_size: int = 32  # image_folder only: images are resized to this square size
    # text only: glob patterns of text files (none: the Python standard library's sources),
    # split into train/validation by file, served as sequences of seq_len byte tokens.
    # tokens: [DIR], one directory written by `dist-train tokenize` (memory-mapped shards).
    paths: list[str] = field(default_factory=list)
    seq_len: int = 256
    # synthetic only
    synthetic_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    synthetic_size: int = 4096
    synthetic_classes: int = 10
    # float32: standard-normal tensors; uint8: random pixels held as bytes and normalized on the
    # device, the path image datasets take (a quarter of float32's host-to-device traffic).
    synthetic_dtype: Literal["float32", "uint8"] = "float32"


@dataclass(frozen=True)
class ModelConfig:
    # seed_cnn | mlp | resnet18 | resnet50 | gpt | "package.module:factory"
    name: str = "seed_cnn"
    # gpt only; its context length is data.seq_len
    n_layer: int = 4
    n_head: int = 4
    width: int = 128
    dropout: float = 0.0
    mlp_hidden: list[int] = field(default_factory=lambda: [256, 128])
    # resnet only: 3x3 stride-1 stem without max-pool, for 32x32-sized images.
    small_input_stem: bool = True
    # Extra keyword arguments for a user factory ("module:factory").
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Weights to start from (a run's start only; a run with checkpoints resumes instead): a
    # safetensors file (dist-train export), a run directory (its newest valid checkpoint) or
    # torchvision:WeightsEnum.NAME from $TORCH_HOME. Tensors whose shape differs (a new head)
    # are re-initialised and listed.
    init_from: str | None = None
    # Parameter-name prefixes to freeze (requires_grad=False before wrapping), e.g. [conv1, layer1].
    freeze: list[str] = field(default_factory=list)
    # Every BatchNorm layer stays in eval mode while training: running statistics fixed.
    freeze_batchnorm: bool = False


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw
    eps: float = 1e-8
    # Fused (single-kernel) optimizer steps: faster on a GPU, and they take GradScaler's
    # inf check on the device, so fp16 needs no host sync per step. auto: on when the
    # parameters live on a GPU (not with parallel.cpu_offload).
    fused: bool | Literal["auto"] = "auto"
    # Per parameter-name prefix, a factor on optim.lr (e.g. {backbone: 0.1}); the longest
    # matching prefix wins. Groups are fixed at step 0, so resume always sees the same ones.
    lr_multipliers: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["constant", "cosine", "step", "onecycle"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine: final lr = optim.lr * min_lr_ratio
    step_size: int = 1000  # step: decay every step_size optimizer steps
    gamma: float = 0.1  # step: decay factor


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = None  # optimizer steps
    max_epochs: int | None = None  # stop at whichever limit comes first
    # End this invocation at this step with a checkpoint, as a preemption would; the LR
    # schedule and data order still span the whole run, so a resume continues exactly.
    stop_at_step: int | None = None
    grad_accum_steps: int = 1
    # Samples per optimizer step, all ranks together: sets grad_accum_steps to
    # global_batch / (world size x data.batch_size), which must divide.
    global_batch: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # cross_entropy | bce_with_logits (multi-label) | mse | l1 | model (the model is called as
    # model(inputs, targets) and returns its loss, or a dict with "loss") | "package.module:fn"
    # with fn(outputs, targets) -> scalar mean over the batch.
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0  # cross_entropy only
    # Validation metrics beside val_loss (torchmetrics, README "Losses and tasks"): accuracy
    # (classes; per label for bce_with_logits), top5, precision, recall, f1 (macro), confusion
    # (a matrix saved as files), mae, mse. None: a default per train.loss.
    metrics: list[str] | None = None
    clip_grad_norm: float | None = None
    # A NaN/Inf loss or gradient: `error` stops the run naming the step (the last good checkpoint
    # is kept); `skip` drops that update on every rank, counts it and trains on (one host
    # sync per step to agree on it).
    nonfinite: Literal["error", "skip"] = "error"
    log_every: int = 10
    eval_every: int = 100  # 0 disables evaluation except at the end
    eval_batches: int | None = None  # per rank; None evaluates the whole validation split
    progress_bar: bool = True  # rank 0, and only when attached to a terminal
    # torch.compile each repeated block (the whole model if it names none); ddp and fsdp alike.
    compile: bool = False
    # Peak FLOP/s of one device in TFLOP/s for MFU; None looks the GPU up by name (bf16 dense).
    peak_tflops: float | None = None
    # Keep freed host memory in the process for the next step (glibc only; see
    # process_settings.retain_freed_host_memory) instead of page-faulting it back every step.
    # auto: on for CPU training; off on CUDA, where batches sit in pinned memory that malloc
    # never sees and forked loader workers would each keep what they freed.
    retain_host_memory: bool | Literal["auto"] = "auto"
    # CUDA only. TF32 tensor cores for fp32 matmuls and convolutions (about 7x an H100's fp32
    # CUDA-core rate, 10-bit mantissa products with fp32 accumulation); false for full fp32.
    tf32: bool = True
    # Convolutions in NHWC (channels_last) memory format, model and 4-D inputs alike: what
    # tensor-core convolution kernels read natively. auto: on for 4-D image inputs on CUDA.
    channels_last: bool | Literal["auto"] = "auto"
    # CUDA only: let cuDNN time its convolution algorithms for each new input shape and keep
    # the fastest. Training shapes are fixed, so the search runs once. auto: on unless
    # train.deterministic (the fastest algorithm may differ from run to run).
    cudnn_benchmark: bool | Literal["auto"] = "auto"
    # Deterministic algorithms everywhere (torch.use_deterministic_algorithms, cuDNN's
    # deterministic kernels, cuBLAS's fixed workspace via CUBLAS_WORKSPACE_CONFIG): on a GPU,
    # runs and resumes repeat bit for bit, at some speed; an op with no deterministic CUDA
    # kernel then fails naming itself. A CPU run repeats bit for bit either way.
    deterministic: bool = False
    # Garbage collection at the same steps on every rank: Python's automatic collection is off
    # while the loop runs and a young-generation collection runs every this many steps, so no
    # rank pauses alone while the others wait for it in a collective. 0: automatic collection.
    gc_every_steps: int = 50


@dataclass(frozen=True)
class ParallelConfig:
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    # DDP gradient bucket size; larger buckets mean fewer, bigger all-reduces.
    bucket_cap_mb: float = 25.0
    # fsdp: free each block's gathered parameters after its forward (less memory, one more
    # all-gather in backward); and keep parameters and optimizer state in CPU memory.
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    # fsdp: HSDP over a dp_replicate x dp_shard mesh of R x world/R processes: parameters sharded
    # within each group of world/R (a node), gradients all-reduced across the R groups, so only
    # the slow inter-node network carries one all-reduce of a shard. auto: one group per node.
    replicate_degree: int | Literal["auto"] = 1
    # Recompute each block's activations in backward instead of keeping them: less memory,
    # about one more forward of compute. Any strategy.
    activation_checkpointing: bool = False
    # fsdp with accumulation: reduce-scatter gradients after every micro-batch, so each rank
    # keeps only its gradient shard between micro-batches (less memory, k times the traffic).
    sync_every_micro_batch: bool = False
    # auto: NCCL for GPU tensors and gloo for CPU ones on CUDA, gloo on a CPU. gloo: gloo for
    # every tensor (copied through host memory, slow), and then ranks may share a GPU, e.g. 2 ranks
    # on a workstation's one GPU to debug what only several ranks show.
    backend: Literal["auto", "gloo"] = "auto"
    # A collective that waits this long for a rank (hung, dead, or far slower) fails with a
    # message naming the silent ranks, instead of hanging the job (default: gloo's 30 minutes).
    collective_timeout_s: float = 1800.0


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100  # 0 saves only at the end
    keep_last: int = 3
    resume: str = "auto"  # auto | never | PATH to a checkpoint directory
    # Write checkpoints in a background thread: training stalls only for the copy to host
    # memory (async_checkpoint.py). The final save and a save on a stop signal stay synchronous.
    async_save: bool = False
    # On this signal (as on SIGTERM) every rank finishes its optimizer step, one checkpoint is
    # saved and the job exits 75 to be requeued; SLURM sends it with --signal=B:USR1@SECONDS.
    preempt_signal: str = "SIGUSR1"


@dataclass(frozen=True)
class PruneConfig:
    # Fraction of the Linear/Conv weights set to zero by global magnitude (dist-train prune) and
    # kept zero after every optimizer step; null: no pruning. Biases and norms are never pruned.
    sparsity: float | None = None
    # oneshot: every zero at the start; gradual: s_t = sparsity * (1 - (1 - t/n)^3) (Zhu & Gupta)
    # from start_step to end_step (null: the run's last step).
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    start_step: int = 0
    end_step: int | None = None


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "dist_train"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Rank 0 also writes every logged scalar to RUN_DIR/tensorboard/ (and the run's
    # hyperparameters with its final validation metrics when it ends).
    tensorboard: bool = False


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# Signals a process can catch that schedulers use to announce an end (not SIGKILL or SIGSTOP).
PREEMPT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGXCPU")

# --------------------------------------------------------------------------- loading


def load_config(source: str | Path | dict[str, Any] | Config | None, overrides: list[str] = ()) -> Config:
    """Build a Config from schema defaults, then a YAML file (or a mapping of the same shape,
    or a Config), then `a.b=value` overrides; validated the same way whichever the source."""
    values: dict[str, Any] = {}
    if isinstance(source, Config):
        values = to_dict(source)
    elif isinstance(source, dict):
        values = copy.deepcopy(source)
    elif source is not None:
        values = _read_yaml(Path(source))
    hints = _leaf_hints()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if not _is_settable(key, hints):
            raise _unknown_key(key)
        value = _parse_override_value(raw)
        if hints.get(key) in (str, str | None) and isinstance(value, (int, float, bool, datetime.date)):
            value = raw.strip()  # a string field takes the text as typed: run.name=0123 must not become 83
        _set_dotted(values, key, value)
    cfg = _build(Config, values, prefix="")
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text (UTF-8) YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _parse_override_value(raw: str) -> Any:
    # YAML scalars give the CLI the same typing as the file: 0.05 -> float, true -> bool.
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    node = values
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])} is not a section, cannot set {key}")
        node = child
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        _merge(node[parts[-1]], value)  # `optim={lr: 0.2}` changes lr, keeps the file's other keys
    else:
        node[parts[-1]] = value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _leaf_hints(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key (sections too) mapped to its type hint."""
    hints: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        hints[prefix + name] = hint
        if dataclasses.is_dataclass(hint):
            hints.update(_leaf_hints(hint, prefix + name + "."))
    return hints


def _is_settable(key: str, hints: dict[str, Any]) -> bool:
    """A schema key, or a key inside a free-form mapping field such as model.kwargs.depth."""
    if key in hints:
        return True
    parts = key.split(".")
    return any(get_origin(hints.get(".".join(parts[:i]))) is dict for i in range(1, len(parts)))


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, prefix + name + "."))
    return keys


def _unknown_key(key: str) -> ConfigError:
    keys = all_keys()
    by_lower = {k.lower(): k for k in keys}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1].lower()
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1].lower() == leaf]
    # train.lr is closer to "train.loss" as text, but the user meant the lr that lives in optim:
    # a key that exists under another section beats a look-alike.
    suggestion = same_leaf[0] if len(same_leaf) == 1 else None
    suggestion = suggestion or (by_lower[close[0]] if close else None)
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    shown = " ".join(key.split())  # a YAML key may hold a newline; the error stays one line
    return ConfigError(f"unknown config key {shown}{hint}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}  # a section whose keys are all commented out
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a section (mapping), got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown_key(prefix + str(key))
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, values[name], prefix + name + ".")
        else:
            kwargs[name] = _coerce(values[name], hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for option in inner:  # bool | Literal["auto"]: the first type that takes the value
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        words = [word for option in inner for word in _describe(option)]
        raise ConfigError(f"{key} must be {', '.join(words[:-1])} or {words[-1]}; got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 as a string; users mean a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if hint is Any:
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")  # a schema bug, not user error


def _describe(hint: Any) -> list[str]:
    """The values a type takes, in words, for an error message."""
    if get_origin(hint) is Literal:
        return [str(arg) for arg in get_args(hint)]
    return {bool: ["true", "false"], int: ["an integer"], float: ["a number"], str: ["a string"]}.get(hint, [str(hint)])


# --------------------------------------------------------------------------- validation

FLOAT32_MAX = 3.4028234663852886e38
DATASETS = ("digits", "image_folder", "cifar10", "mnist", "synthetic", "text", "tokens")
LOSSES = ("cross_entropy", "bce_with_logits", "mse", "l1", "model")
METRICS = ("accuracy", "top5", "precision", "recall", "f1", "confusion", "mae", "mse")


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


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
