"""Pretrained weights and fine-tuning: model.init_from, model.freeze, model.freeze_batchnorm.

`prepare_model` runs on every rank once the model is built and before the strategy wraps it:
DDP registers only the parameters that require gradients when it wraps, and FSDP shards
whatever each rank holds, so weights and requires_grad must be final by then. Parameter
names are the user's (`param_name`): what checkpoints and exports use, what model.freeze and
optim.lr_multipliers match.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_train import checkpoint
from dist_train.checkpoint.export import weights_checkpoint
from dist_train.config import ConfigError, ModelConfig, UserError
from dist_train.distributed import all_gather_objects

TORCHVISION = "torchvision:"
TORCH_FILES = (".pt", ".pth", ".bin")  # torch.save'd state dicts, read with weights_only=True


class InitFromError(UserError):
    pass


# --------------------------------------------------------------------------- names


def param_name(name: str) -> str:
    """A parameter's name as the user's model spells it: torch.compile's OptimizedModule adds
    `_orig_mod.` (at the root, or above a compiled submodule). DCP strips it the same way, so
    these are the names checkpoints and exports hold."""
    return name.replace("_orig_mod.", "")


def user_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) with the user's names, also through DDP's wrapper (`module.`)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    for name, param in model.named_parameters():
        yield param_name(name), param


def longest_match(name: str, prefixes: Iterable[str]) -> str | None:
    """The longest prefix that names `name` or a module above it. Prefixes end at a dot, so
    `layer1` covers layer1.0.conv1.weight but not layer10.weight (nor blocks.1 blocks.10)."""
    return max((p for p in prefixes if _covers(p, name)), key=len, default=None)


def _covers(prefix: str, name: str) -> bool:
    stem = prefix.rstrip(".")  # `layer1.` means layer1 too
    return name == stem or name.startswith(stem + ".")


def _unmatched(prefix: str, key: str, model: nn.Module) -> ConfigError:
    top = sorted({name.split(".")[0] for name, _ in user_named_parameters(model)})
    return ConfigError(
        f"{key}: {prefix!r} matches no parameter of the model (prefixes are whole parts of a dotted name; "
        f"the model's start with {', '.join(top)})"
    )


def unmatched_prefix_error(prefix: str, key: str, model: nn.Module) -> ConfigError:
    """The one-line error for a prefix in `key` that selects nothing trainable: names what the
    model's parameters are called, or says that model.freeze froze what it matched."""
    frozen = [n for n, p in user_named_parameters(model) if not p.requires_grad and _covers(prefix, n)]
    if frozen:
        return ConfigError(
            f"{key}: {prefix!r} matches only frozen parameters (model.freeze, or requires_grad=False in the "
            f"model), e.g. {frozen[0]}"
        )
    return _unmatched(prefix, key, model)


# --------------------------------------------------------------------------- the run's start


def prepare_model(model: nn.Module, cfg: ModelConfig, resuming: bool) -> list[str]:
    """model.init_from (only when the run does not resume), then model.freeze; returns the
    lines to log. Call it on every rank, on the plain model, before wrapping."""
    lines = []
    if cfg.init_from is not None:
        if resuming:
            lines.append(f"model.init_from={cfg.init_from} not applied: the run resumes, its checkpoint's weights win")
        else:
            lines += _agreed(lambda: load_pretrained(model, cfg.init_from))
    if cfg.freeze:
        lines.append(freeze(model, cfg.freeze))
    if cfg.freeze_batchnorm and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError("model.freeze_batchnorm=true but the model has no BatchNorm layer")
    return lines


def _agreed(load: Callable[[], list[str]]) -> list[str]:
    """Run `load` on every rank and fail on all of them if it failed on any (a file only some
    nodes see): no rank goes on alone into a collective the others never reach."""
    failure: UserError | None = None
    lines: list[str] = []
    try:
        lines = load()
    except UserError as exc:
        failure = exc
    messages = all_gather_objects(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    for rank, message in enumerate(messages):
        if message is not None:
            raise InitFromError(f"(rank {rank}) {message}")
    return lines


def train_mode(model: nn.Module, cfg: ModelConfig) -> None:
    """model.train(), except that with model.freeze_batchnorm every BatchNorm layer stays in
    eval mode: it normalizes with its running statistics and never updates them (the small or
    unrepresentative batches of a fine-tuning set would overwrite the pretrained ones)."""
    model.train()
    if cfg.freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def freeze(model: nn.Module, prefixes: list[str]) -> str:
    """requires_grad=False on every parameter a prefix names; returns the line to log."""
    named = list(user_named_parameters(model))
    for prefix in prefixes:
        if not any(_covers(prefix, name) for name, _ in named):
            raise _unmatched(prefix, "model.freeze", model)
    frozen = [param for name, param in named if longest_match(name, prefixes) is not None]
    if len(frozen) == len(named):
        raise ConfigError(f"model.freeze={prefixes} freezes every parameter: nothing would train")
    for param in frozen:
        param.requires_grad_(False)
    values, total = sum(p.numel() for p in frozen), sum(p.numel() for _, p in named)
    return (
        f"model.freeze: {len(frozen)} of {len(named)} parameter tensors frozen "
        f"({values:,} of {total:,} values): {', '.join(prefixes)}"
    )


# --------------------------------------------------------------------------- model.init_from


def load_pretrained(model: nn.Module, source: str) -> list[str]:
    """Copy the weights `source` names into `model` (parameters and buffers). Tensors whose
    shape differs (a head for another class count) keep the model's fresh initialisation;
    a tensor on one side only is an error: the file belongs to another architecture."""
    weights, where = read_weights(source)
    own = {param_name(name): tensor for name, tensor in model.state_dict().items()}
    missing = next((name for name in own if name not in weights), None)
    if missing is not None:
        raise InitFromError(f"model.init_from={source}: {where} has no {missing}, which the model has")
    extra = next((name for name in weights if name not in own), None)
    if extra is not None:
        raise InitFromError(f"model.init_from={source}: {where} holds {extra}, which the model does not have")
    reshaped = [name for name, tensor in own.items() if weights[name].shape != tensor.shape]
    with torch.no_grad():
        for name, tensor in own.items():
            if name not in reshaped:
                tensor.copy_(weights[name])  # state_dict() tensors share the model's storage
    lines = [f"model.init_from: {len(own) - len(reshaped)} of {len(own)} tensors loaded from {where}"]
    if reshaped:
        shapes = ", ".join(f"{n} {_shape(weights[n])} -> {_shape(own[n])}" for n in reshaped)
        lines.append(f"model.init_from: {len(reshaped)} tensors of another shape stay freshly initialised: {shapes}")
    return lines


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def read_weights(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors `source` names and where they were read (for messages): a safetensors file,
    a torch state dict (.pt/.pth/.bin), a run directory (its newest valid checkpoint), a
    checkpoint directory, or torchvision:Weights.NAME from the local torch hub cache."""
    if source.startswith(TORCHVISION):
        path = torchvision_file(source.removeprefix(TORCHVISION))
        return _torch_file(path, source), str(path)
    if source.startswith("timm:"):
        raise InitFromError(
            f"model.init_from={source}: timm names are not supported; save timm's model.state_dict() with "
            "safetensors or torch.save and give that file"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        found = weights_checkpoint(path)
        return checkpoint.read_weights(found), str(found)
    if not path.is_file():
        raise InitFromError(f"model.init_from={source}: no such file or directory")
    if path.suffix in TORCH_FILES:
        return _torch_file(path, source), str(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path)), str(path)
    except (SafetensorError, OSError) as exc:
        raise InitFromError(
            f"model.init_from={source}: not a readable safetensors file ({exc}); torch state dicts end in "
            f"{'/'.join(TORCH_FILES)}"
        ) from None


def _torch_file(path: Path, source: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn download or a foreign pickle: one line
        raise InitFromError(f"model.init_from={source}: cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitFromError(f"model.init_from={source}: {path} is not a state dict (name -> tensor)")
    return state


def torchvision_file(name: str) -> Path:
    """Where torch.hub keeps the weights torchvision calls `name` (ResNet50_Weights.IMAGENET1K_V2):
    $TORCH_HOME/hub/checkpoints/<the URL's file name>. Never downloads: a job on a cluster node
    without network would hang or fail late, so a missing file is one line saying what to fetch."""
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (ValueError, KeyError):
        raise InitFromError(
            f"model.init_from=torchvision:{name}: unknown torchvision weights (expected Enum.NAME, e.g. "
            "ResNet50_Weights.IMAGENET1K_V2)"
        ) from None
    url = weights.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)
    if not path.is_file():
        raise InitFromError(
            f"model.init_from=torchvision:{name}: {path} is not there (nothing is downloaded); "
            f"fetch {url} into that file, or point TORCH_HOME at the cache that holds it"
        )
    return path
