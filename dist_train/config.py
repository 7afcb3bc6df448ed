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


def setting(default: Any, help: str) -> Any:
    """A schema field with its one line of help, which `dist-train config --keys` and the
    README's configuration table show (keys_table); a list or dict default is copied per Config."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunConfig:
    name: str = setting("default", "the run's name: its directory is `{output_dir}/{name}/`")
    output_dir: str = setting("runs", "where run directories are made: `{output_dir}/{name}/`")
    seed: int = setting(0, "seed of the model's initialisation, the data order and augmentation")


@dataclass(frozen=True)
class DataConfig:
    # A factory `package.module:factory` is called as factory(cfg: DataConfig, **data.kwargs) and
    # returns the train and validation datasets (map-style) and optionally the num_classes and
    # input_shape the model needs (README).
    dataset: str = setting(
        "digits",
        "`digits`, `image_folder`, `cifar10`, `mnist`, `synthetic`, `text`, `tokens` (shards from "
        "`dist-train tokenize`, in `data.paths`), or `package.module:factory` (see Your own dataset)",
    )
    kwargs: dict[str, Any] = setting({}, "keyword arguments for a dataset factory")
    # For when the data cannot say: a user dataset that returns no spec, or datasets passed to
    # dist_train.fit.
    num_classes: int | None = setting(
        None, "classes (or outputs) the model is built for; wins over what a factory returns or the data show"
    )
    input_shape: list[int] | None = setting(
        None, "one input's shape the model is built for; wins over what a factory returns or the data show"
    )
    # The replacement is chosen from the bad sample's key, so it is the same on every run.
    skip_bad_samples: bool = setting(
        False,
        "an unreadable sample (corrupt file, decode error): false stops with one line naming its index (and "
        "file); true replaces it (reproducibly) and logs `bad_samples`",
    )
    root: str = setting(
        "data",
        "where `image_folder`, `cifar10` and `mnist` live; `image_folder` expects `train/` (and optionally `val/`)",
    )
    download: bool = setting(False, "`cifar10`, `mnist`: download into `data.root` when the files are missing")
    # auto is recorded in the checkpoints, so a resumed run keeps the micro-batch it searched.
    batch_size: int | Literal["auto"] = setting(
        64, "per rank, per micro-batch; `auto`: the largest that fits, searched at start-up (see Tuning)"
    )
    # CPU: nothing runs out there, so an estimate is capped (see batch_finder).
    max_memory_gb: float | None = setting(
        None,
        "`data.batch_size: auto`: what a trial may use per rank, in GiB (CUDA: peak allocated; CPU: an "
        "estimate); null: until out of memory",
    )
    eval_batch_size: int = setting(256, "per rank, in validation and `dist-train eval`")
    num_workers: int = setting(0, "DataLoader worker processes per rank (0: load in the training process)")
    augment: bool = setting(True, "random shifts (and flips, for `cifar10` and `image_folder`) of training images")
    val_fraction: float = setting(
        0.2, "fraction held out for validation: `image_folder` without a `val/` folder, and `text` files"
    )
    image_size: int = setting(32, "`image_folder`: images are resized to this square size")
    # text files are split into train/validation by file and served as sequences of seq_len byte tokens.
    paths: list[str] = setting(
        [],
        "`text`: file globs (default: Python's stdlib sources); `tokens`: one directory written by "
        "`dist-train tokenize` (memory-mapped shards)",
    )
    seq_len: int = setting(256, "`text`, `tokens`: tokens per sample, and `gpt`'s context length")
    synthetic_shape: list[int] = setting([3, 32, 32], "`synthetic`: one input's shape, [channels, height, width]")
    synthetic_size: int = setting(4096, "`synthetic`: training samples (validation: an eighth as many)")
    synthetic_classes: int = setting(10, "`synthetic`: number of classes")
    # uint8 is the path image datasets take: a quarter of float32's host-to-device traffic.
    synthetic_dtype: Literal["float32", "uint8"] = setting(
        "float32",
        "`synthetic`: `float32` standard-normal inputs; `uint8`: pixels held as bytes and normalized on the "
        "device, as `cifar10`/`mnist`",
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting("seed_cnn", "`seed_cnn`, `mlp`, `resnet18`, `resnet50`, `gpt`, or `package.module:factory`")
    n_layer: int = setting(4, "`gpt`: transformer blocks")
    n_head: int = setting(4, "`gpt`: attention heads per block")
    width: int = setting(128, "`gpt`: embedding width, a multiple of `model.n_head`")
    dropout: float = setting(0.0, "`gpt`: dropout probability while training")
    mlp_hidden: list[int] = setting([256, 128], "`mlp`: hidden layer sizes")
    small_input_stem: bool = setting(
        True, "`resnet18`, `resnet50`: a 3x3 stride-1 stem without max-pool, for 32x32-sized images"
    )
    kwargs: dict[str, Any] = setting({}, "keyword arguments for a model factory (`package.module:factory`)")
    # Read at a run's start only: a run with checkpoints resumes instead. Tensors whose shape
    # differs (a new head) are re-initialised and listed.
    init_from: str | None = setting(
        None,
        "weights to start from: a safetensors file (`dist-train export`), a run directory (its newest valid "
        "checkpoint), `torchvision:Enum.NAME` from `$TORCH_HOME` (see Fine-tuning)",
    )
    # Frozen (requires_grad=False) before wrapping, so DDP and FSDP never see them as trainable.
    freeze: list[str] = setting([], "parameter-name prefixes to freeze, e.g. `[conv1, layer1]`")
    freeze_batchnorm: bool = setting(
        False, "keep every BatchNorm layer in eval mode while training (running statistics fixed)"
    )


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = setting("sgd", "`sgd` (momentum, nesterov), `adam`, `adamw`")
    lr: float = setting(0.1, "peak learning rate; the schedule scales it")
    weight_decay: float = setting(0.0, "weight decay")
    momentum: float = setting(0.9, "`sgd`: momentum")
    nesterov: bool = setting(False, "`sgd`: Nesterov momentum (needs `optim.momentum` > 0)")
    betas: list[float] = setting([0.9, 0.999], "`adam`, `adamw`: decay rates of the gradient's moment estimates")
    eps: float = setting(1e-8, "`adam`, `adamw`: added to the denominator for numerical stability")
    # Fused steps are faster on a GPU and take GradScaler's inf check on the device, so fp16 needs
    # no host sync per step.
    fused: bool | Literal["auto"] = setting(
        "auto",
        "fused optimizer kernels; auto: where the parameters live on a GPU and the kernel runs on them (not SGD "
        "under FSDP; `true` there is refused)",
    )
    # Groups are fixed at step 0, so resume always sees the same ones.
    lr_multipliers: dict[str, float] = setting(
        {},
        "`{prefix: factor}`: parameters whose name starts with prefix train at `optim.lr x factor`; the "
        "longest matching prefix wins",
    )


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["constant", "cosine", "step", "onecycle"] = setting(
        "cosine", "`constant`, `cosine`, `step`, `onecycle`"
    )
    warmup_steps: int = setting(0, "linear warmup over this many optimizer steps")
    min_lr_ratio: float = setting(0.0, "`cosine`: the final lr is `optim.lr x min_lr_ratio`")
    step_size: int = setting(1000, "`step`: decay every this many optimizer steps")
    gamma: float = setting(0.1, "`step`: decay factor")


@dataclass(frozen=True)
class EmaConfig:
    decay: float | None = setting(
        None,
        "keep an exponential moving average of the weights with this decay (e.g. 0.999); it is what evaluation, "
        "`dist-train eval` and `export` use (null: off)",
    )
    warmup: bool = setting(True, "ramp the decay up as `min(decay, (1 + n) / (10 + n))` over the first updates")


@dataclass(frozen=True)
class EarlyStopConfig:
    metric: str | None = setting(
        None, "end the run when this validation metric (`val_loss`, `val_acc`, ...) stops improving (null: off)"
    )
    mode: Literal["min", "max"] = setting("min", "`min`: lower is better (losses); `max`: higher is (accuracy)")
    patience: int = setting(5, "evaluations in a row without improvement before the run stops")
    min_delta: float = setting(0.0, "an improvement must beat the best value by more than this")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = setting(None, "optimizer steps; with `train.max_epochs`, whichever ends first")
    max_epochs: int | None = setting(None, "epochs; with `train.max_steps`, whichever ends first")
    # Ends as a preemption would: the LR schedule and data order still span the whole run, so a
    # resume continues exactly.
    stop_at_step: int | None = setting(
        None, "end this invocation at a step (with a checkpoint); the schedule still spans the run"
    )
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step")
    # It must divide: a global batch the ranks cannot make up is an error, never a silent change.
    global_batch: int | None = setting(
        None,
        "samples per optimizer step, all ranks together; sets `train.grad_accum_steps` to it / (world x "
        "`data.batch_size`)",
    )
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32", "`fp32`, `bf16` (CPU and CUDA), `fp16` (CUDA, with GradScaler)"
    )
    # `model`: the model is called as model(inputs, targets) and returns its loss, or a dict with
    # "loss"; `package.module:fn` is fn(outputs, targets) -> scalar mean over the batch.
    loss: str = setting(
        "cross_entropy",
        "`cross_entropy`, `bce_with_logits` (multi-label), `mse`, `l1`, `model` or `package.module:fn` "
        "(see Losses and tasks)",
    )
    label_smoothing: float = setting(0.0, "`cross_entropy` only: label smoothing")
    # torchmetrics; accuracy is per label for bce_with_logits, and confusion saves a matrix as files.
    metrics: list[str] | None = setting(
        None,
        "validation metrics beside `val_loss`: `accuracy`, `top5`, `precision`, `recall`, `f1`, `confusion`, "
        "`mae`, `mse`; null: a default per loss",
    )
    clip_grad_norm: float | None = setting(None, "max global gradient norm")
    # skip costs one host sync per step: every rank must agree to drop the update.
    nonfinite: Literal["error", "skip"] = setting(
        "error",
        "NaN/Inf loss or gradient: `error` stops naming the step (the last good checkpoint is kept); `skip` "
        "drops the update on every rank and logs `skipped_steps`",
    )
    log_every: int = setting(10, "log every this many optimizer steps")
    eval_every: int = setting(100, "evaluate every this many optimizer steps, and at the end (0: only at the end)")
    eval_batches: int | None = setting(
        None, "validation batches per rank (always the same ones); null = all of the validation split"
    )
    progress_bar: bool = setting(True, "a progress bar on rank 0, when attached to a terminal")
    compile: bool = setting(
        False, "`torch.compile` each repeated block (the whole model if it has none); ddp and fsdp alike"
    )
    peak_tflops: float | None = setting(
        None, "one device's peak in TFLOP/s for MFU; null looks the GPU up by name (bf16 dense)"
    )
    # Off on CUDA: batches sit in pinned memory that malloc never sees, and forked loader workers
    # would each keep what they freed. See process_settings.retain_freed_host_memory.
    retain_host_memory: bool | Literal["auto"] = setting(
        "auto",
        "glibc keeps freed host memory for the next step instead of page-faulting it back in (see "
        "Performance); auto: on for CPU training, off on CUDA",
    )
    # TF32 is about 7x an H100's fp32 CUDA-core rate: 10-bit mantissa products, fp32 accumulation.
    tf32: bool = setting(True, "CUDA: TF32 tensor cores for fp32 matmuls and convolutions; false for full fp32")
    # NHWC is what tensor-core convolution kernels read natively.
    channels_last: bool | Literal["auto"] = setting(
        "auto", "NHWC (channels_last) model and 4-D inputs for images; auto: on CUDA, not with `fsdp`"
    )
    # Training shapes are fixed, so the search runs once; not under train.deterministic, since the
    # fastest algorithm may differ from run to run.
    cudnn_benchmark: bool | Literal["auto"] = setting(
        "auto",
        "CUDA: cuDNN times its convolution algorithms for each new input shape and keeps the fastest (auto: on "
        "unless `train.deterministic`)",
    )
    # torch.use_deterministic_algorithms, cuDNN's deterministic kernels and cuBLAS's fixed
    # workspace via CUBLAS_WORKSPACE_CONFIG. A CPU run repeats bit for bit either way.
    deterministic: bool = setting(
        False,
        "deterministic algorithms and cuDNN kernels (and cuBLAS's fixed workspace on torch 2.6-2.9): GPU runs "
        "repeat bit for bit, at some speed; an op without a deterministic CUDA kernel fails naming itself",
    )
    # The same steps on every rank, so no rank pauses alone for a collection while the others wait
    # for it in a collective.
    gc_every_steps: int = setting(
        50,
        "Python's automatic garbage collection is off in the loop; every rank collects the young "
        "generation at these steps (0: automatic)",
    )
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass(frozen=True)
class ParallelConfig:
    strategy: Literal["none", "ddp", "fsdp"] = setting(
        "none", "`none` (one process), `ddp`, or `fsdp` (FSDP2, needs `launch`)"
    )
    bucket_cap_mb: float = setting(
        25.0, "`ddp`: gradient bucket size in MiB; larger buckets mean fewer, bigger all-reduces"
    )
    # Resharding costs one more all-gather in backward.
    reshard_after_forward: bool = setting(True, "`fsdp`: free each block's gathered parameters after its forward")
    cpu_offload: bool = setting(False, "`fsdp`: keep parameters and optimizer state in CPU memory")
    # HSDP over a dp_replicate x dp_shard mesh: gradients are all-reduced across the R groups, so
    # only the slow inter-node network carries one all-reduce of a shard.
    replicate_degree: int | Literal["auto"] = setting(
        1,
        "`fsdp`: R > 1 (or `auto`, one per node) is HSDP, sharded within world/R ranks, replicated R times",
    )
    activation_checkpointing: bool = setting(
        False, "recompute each block's activations in backward (less memory, about one more forward); any strategy"
    )
    sync_every_micro_batch: bool = setting(
        False,
        "`fsdp` with accumulation: reduce-scatter after every micro-batch, so each rank keeps only its gradient "
        "shard (less memory, more traffic)",
    )
    # gloo copies GPU tensors through host memory (slow), and then ranks may share a GPU, e.g. 2
    # ranks on a workstation's one GPU to debug what only several ranks show.
    backend: Literal["auto", "gloo"] = setting(
        "auto",
        "`auto`: NCCL for GPU tensors, gloo for CPU ones (gloo only on a CPU); `gloo`: gloo for everything, and "
        "ranks may share a GPU",
    )
    # Better than hanging the job: a rank may be hung, dead or far slower. Default: gloo's 30 minutes.
    collective_timeout_s: float = setting(
        1800.0, "a collective waiting longer than this for a rank fails, naming the silent ranks"
    )


@dataclass(frozen=True)
class KeepBestConfig:
    metric: str | None = setting(
        None, "also keep the checkpoints with the best values of this validation metric (null: off)"
    )
    mode: Literal["min", "max"] = setting("min", "`min`: lower is better (losses); `max`: higher is (accuracy)")
    k: int = setting(1, "how many best checkpoints are kept, beside the newest `checkpoint.keep_last`")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = setting(100, "save every this many optimizer steps, and at the end (0: only at the end)")
    keep_last: int = setting(3, "checkpoints kept; older ones are deleted after each save")
    keep_best: KeepBestConfig = field(default_factory=KeepBestConfig)
    resume: str = setting(
        "auto", "`auto` (newest valid), `never` (refuse if checkpoints exist), or a checkpoint directory's path"
    )
    # See async_checkpoint.py. The final save and a save on a stop signal stay synchronous.
    async_save: bool = setting(
        False, "write checkpoints in a background thread; training waits only for the copy to host memory"
    )
    # SLURM sends it with --signal=B:USR1@SECONDS; exit code 75 asks for a requeue.
    preempt_signal: str = setting(
        "SIGUSR1",
        "on it (and on SIGTERM) every rank finishes its step, one checkpoint is saved and the job exits 75",
    )


@dataclass(frozen=True)
class PruneConfig:
    # Biases and norms are never pruned.
    sparsity: float | None = setting(
        None,
        "fraction of all Linear/Conv weights set to zero by global magnitude and kept zero after every step "
        "(see Smaller models: pruning); null: no pruning",
    )
    # gradual is Zhu & Gupta's s_t = sparsity * (1 - (1 - t/n)^3).
    schedule: Literal["oneshot", "gradual"] = setting(
        "oneshot",
        "`oneshot`: every zero before the first step; `gradual`: the cubic ramp from `prune.start_step` to "
        "`prune.end_step`",
    )
    start_step: int = setting(0, "`gradual`: the step the ramp starts at")
    end_step: int | None = setting(None, "`gradual`: the step the ramp ends at (null: the run's last step)")


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = setting("disabled", "`disabled`, `offline`, `online`")
    project: str = setting("dist_train", "W&B project")
    entity: str | None = setting(None, "W&B entity (team or user); null: W&B's default")
    tags: list[str] = setting([], "W&B run tags")


@dataclass(frozen=True)
class ProfileConfig:
    start_step: int | None = setting(
        None, "profile the steps after this one with torch.profiler (null: off; 0: from the first step)"
    )
    steps: int = setting(5, "how many optimizer steps the profile covers")
    ranks: list[int] = setting([0], "the ranks that profile, each writing its own trace")


@dataclass(frozen=True)
class MlflowConfig:
    enabled: bool = setting(False, "rank 0 also logs to MLflow: params, every logged scalar, one run across resumes")
    tracking_uri: str | None = setting(
        None,
        "the MLflow tracking store or server (`http://...`, `sqlite:///...`); null: a file store in `RUN_DIR/mlruns`",
    )
    experiment: str = setting("dist_train", "the MLflow experiment the run goes into")


@dataclass(frozen=True)
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tensorboard: bool = setting(
        False,
        "rank 0 also writes every logged scalar to `RUN_DIR/tensorboard/`, and the hyperparameters with the "
        "final validation metrics at the end (see Logging)",
    )


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
    callbacks: list[dict[str, Any]] = setting(
        [], "users' own components: `[{target: package.module:Class, ...keyword arguments}]`, called in order"
    )

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


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key as `dist-train config --keys` and the README show it."""

    key: str
    type: str  # e.g. "int | auto"
    default: str  # as YAML writes it, e.g. "null", "[3, 32, 32]"
    help: str


def key_docs(cls: type = Config, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the schema (sections left out), in schema order, with its help."""
    docs = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            docs.extend(key_docs(hint, prefix + f.name + "."))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        docs.append(KeyDoc(prefix + f.name, _type_words(hint), yaml_value(default), f.metadata.get("help", "")))
    return docs


def keys_table(prefix: str = "") -> str:
    """The README's configuration table (markdown), one row per key starting with `prefix`."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for doc in key_docs():
        if doc.key.startswith(prefix):
            # A "|" would end the cell, even inside a code span.
            cells = [f"`{doc.key}`", f"`{doc.default}`", doc.help]
            rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def yaml_value(value: Any) -> str:
    """A value as a YAML file (and so a key=value override) writes it: null, true, [3, 32, 32]."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def _type_words(hint: Any) -> str:
    """A field's type as users write its values: `int | null`, `sgd | adam | adamw`, `list[int]`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_words(arg) for arg in args)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_words(arg) for arg in args)}]"
    return {type(None): "null", Any: "any"}.get(hint) or hint.__name__


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
# train.metrics names and what evaluation logs for each; `confusion` logs nothing: it is files.
LOGGED_METRICS = {
    "accuracy": "val_acc",
    "top5": "val_top5",
    "precision": "val_precision",
    "recall": "val_recall",
    "f1": "val_f1",
    "mae": "val_mae",
    "mse": "val_mse",
}


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


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
