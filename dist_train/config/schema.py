"""The config's schema: one frozen dataclass per section, each field with its default and one
line of help (`setting`), and the names the values may take."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


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
    # CPU: nothing runs out there, so an estimate is capped (see train/batch_search.py).
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
    # See checkpoint/async_save.py. The final save and a save on a stop signal stay synchronous.
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
