"""The datasets dist_train knows by name, and what a model needs to know of them (DataSpec)."""

from __future__ import annotations

import dataclasses
import glob
import gzip
import importlib.util
import inspect
import os
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from dist_train.config import ConfigError, DataConfig, UserError, import_object, is_import_path
from dist_train.data.augmentation import RandomShift, torchvision_pipeline


class DataError(UserError):
    pass


@dataclass(frozen=True)
class DataSpec:
    input_shape: tuple[int, ...]  # (channels, height, width) for images, (seq_len,) for text
    num_classes: int | None  # classes or outputs; None where nothing told it and a model object needs none


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    train_transform: Callable | None
    eval_transform: Callable | None
    spec: DataSpec
    # The validation loss of a trivial predictor, for scale (text: byte frequencies of train).
    baseline_val_loss: float | None = None
    # Images held as uint8: (mean, std) per channel of [0, 1] pixels, applied on the device.
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    origin: str = "the dataset given to dist_train.fit"  # what one-line errors call it


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 8x8 images, pixel values 0-16, and their labels), read from
    the file sklearn.datasets.load_digits reads: importing scikit-learn to get there costs every
    process that trains on digits more than a second, for one 60 kB file."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.dataset=digits needs scikit-learn installed (its digits file ships with it)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _digits(cfg: DataConfig) -> Datasets:
    pixels, targets = digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(targets, dtype=torch.long)
    # A fixed split (seed 0), independent of run.seed, so validation numbers compare across runs.
    order = torch.tensor(np.random.RandomState(0).permutation(len(labels)))
    n_val = len(labels) // 5
    val_idx, train_idx = order[:n_val], order[n_val:]
    # The whole set fits in memory, so normalize it once instead of per sample; the random
    # shift then pads with the normalized value of a blank pixel.
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    # Digits are not mirror-symmetric, so no horizontal flip; a one-pixel shift is realistic.
    train_tf = RandomShift(1, fill=(-mean / std).item()) if cfg.augment else None
    return Datasets(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        train_transform=train_tf,
        eval_transform=None,
        spec=DataSpec((1, 8, 8), 10),
    )


def _torchvision_dataset(cfg: DataConfig, name: str, download: bool) -> Datasets:
    """CIFAR-10 or MNIST as uint8 tensors in memory: augmented a chunk at a time on the host
    and normalized on the device, where per-sample PIL decoding and transforms could not keep
    a GPU fed. torchvision still reads (and downloads) the files."""
    from torchvision import datasets

    cls, pad, flip, mean, std = {
        "cifar10": (datasets.CIFAR10, 4, True, CIFAR10_MEAN, CIFAR10_STD),
        "mnist": (datasets.MNIST, 2, False, MNIST_MEAN, MNIST_STD),  # digits are not mirror-symmetric
    }[name]
    try:
        train = cls(cfg.root, train=True, download=download)
        val = cls(cfg.root, train=False, download=download)
    except (RuntimeError, OSError) as exc:  # missing or corrupt files; a failed download
        hint = "" if download else "; set data.download=true to fetch it"
        raise DataError(f"{name} not found under data.root={cfg.root} ({exc}){hint}") from None
    train_images, val_images = uint8_images(train.data), uint8_images(val.data)
    return Datasets(
        train=TensorDataset(train_images, torch.as_tensor(train.targets, dtype=torch.long)),
        val=TensorDataset(val_images, torch.as_tensor(val.targets, dtype=torch.long)),
        # Zero padding: black, as RandomCrop pads [0, 1] images before Normalize.
        train_transform=RandomShift(pad, fill=0, flip=flip) if cfg.augment else None,
        eval_transform=None,
        spec=DataSpec(tuple(train_images.shape[1:]), 10),
        normalize=(mean, std),
    )


def uint8_images(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """torchvision's `.data` as (N, C, H, W) uint8: CIFAR's NHWC array, MNIST's NHW tensor."""
    images = torch.as_tensor(data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous()


def _image_folder(cfg: DataConfig) -> Datasets:
    from torchvision import datasets
    from torchvision.transforms import v2

    root = Path(cfg.root)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist (image_folder needs class-named folders of images)")
    try:
        train_full = datasets.ImageFolder(str(train_dir))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"data.root={root} holds no usable images: {exc}") from None
    if (root / "val").is_dir():
        try:
            val = datasets.ImageFolder(str(root / "val"))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"{root}/val holds no usable images: {exc}") from None
        if val.classes != train_full.classes:
            raise DataError(f"{root}/val has classes {val.classes}, train has {train_full.classes}")
        train = train_full
    else:
        order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = max(1, int(len(order) * cfg.val_fraction))
        train, val = Subset(train_full, order[n_val:]), Subset(train_full, order[:n_val])
    size = cfg.image_size
    train_tf, eval_tf = torchvision_pipeline(
        size=size, pad=size // 8, flip=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment=cfg.augment
    )
    # ImageFolder's loader already gives RGB; images come in any size, so make them square first.
    train_tf, eval_tf = v2.Compose([v2.Resize((size, size)), train_tf]), v2.Compose([v2.Resize((size, size)), eval_tf])
    return Datasets(train, val, train_tf, eval_tf, DataSpec((3, size, size), len(train_full.classes)))


def _synthetic(cfg: DataConfig) -> Datasets:
    # Fixed seed: every rank and every run sees the same tensors.
    g = torch.Generator().manual_seed(0)
    shape, n_val = tuple(cfg.synthetic_shape), max(1, cfg.synthetic_size // 8)
    as_bytes = cfg.synthetic_dtype == "uint8"

    def make(n: int) -> TensorDataset:
        if as_bytes:  # uniform pixels: mean 127.5/255 and std ~73.6/255 per channel
            inputs = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        else:
            inputs = torch.randn(n, *shape, generator=g)
        return TensorDataset(inputs, torch.randint(0, cfg.synthetic_classes, (n,), generator=g))

    train, val, spec = make(cfg.synthetic_size), make(n_val), DataSpec(shape, cfg.synthetic_classes)
    uniform = ((0.5,) * shape[0], (0.2887,) * shape[0])  # a uniform's std is 1/sqrt(12) of its range
    return Datasets(train, val, None, None, spec, normalize=uniform if as_bytes else None)


class TokenSequences(Dataset):
    """Non-overlapping windows of seq_len + 1 byte tokens: (input, next-token targets)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[index * self.seq_len : (index + 1) * self.seq_len + 1].long()
        return window[:-1], window[1:]


def stdlib_sources() -> list[Path]:
    """The running Python's own standard-library sources: real text present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def _read_tokens(files: list[Path]) -> torch.Tensor:
    # Bytes are the tokens (vocabulary 256); a NUL byte marks where one file ends.
    data = b"\0".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _text(cfg: DataConfig) -> Datasets:
    if cfg.paths:
        matches = {Path(p) for pattern in cfg.paths for p in glob.glob(os.path.expanduser(pattern), recursive=True)}
        files = sorted(p for p in matches if p.is_file())
        if not files:
            raise DataError(f"data.paths={cfg.paths} matched no files")
    else:
        files = stdlib_sources()
    if len(files) < 2:
        raise DataError(f"data.dataset=text splits by file and needs at least 2 files, got {len(files)}")
    # Split by file with a fixed seed, so validation text never leaks into training windows.
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = max(1, round(len(files) * cfg.val_fraction))
    val_files = sorted(files[i] for i in order[:n_val])
    train_files = sorted(files[i] for i in order[n_val:])
    train, val = (
        TokenSequences(_read_tokens(train_files), cfg.seq_len),
        TokenSequences(_read_tokens(val_files), cfg.seq_len),
    )
    if len(val) == 0:
        raise DataError(f"the validation files hold fewer than data.seq_len={cfg.seq_len} + 1 bytes")
    baseline = unigram_loss(train.tokens, val.tokens)
    return Datasets(train, val, None, None, DataSpec((cfg.seq_len,), 256), baseline)


def _tokens(cfg: DataConfig) -> Datasets:
    from dist_train.data.tokens import token_datasets

    if len(cfg.paths) != 1:
        raise DataError(
            f"data.dataset=tokens needs data.paths=[DIR], one directory written by dist-train tokenize; got {cfg.paths}"
        )
    train, val, manifest = token_datasets(Path(os.path.expanduser(cfg.paths[0])), cfg.seq_len)
    if len(train) == 0 or len(val) == 0:
        split = "training" if len(train) == 0 else "validation"
        raise DataError(f"the {split} shards of {cfg.paths[0]} hold no window of data.seq_len={cfg.seq_len} + 1 tokens")
    # The vocabulary comes from the shards, so the GPT's embedding matches the tokenizer.
    spec = DataSpec((cfg.seq_len,), int(manifest["vocab_size"]))
    return Datasets(train, val, None, None, spec, manifest.get("unigram_val_loss"))


def unigram_loss(train_tokens: torch.Tensor, val_tokens: torch.Tensor) -> float:
    """Cross-entropy (nats per token) on validation of predicting every byte by its training
    frequency (add-one smoothed): what a model that ignores context achieves."""
    counts = torch.bincount(train_tokens.long(), minlength=256).double() + 1
    log_p = (counts / counts.sum()).log()
    return -log_p[val_tokens.long()].mean().item()


def datasets_from_objects(
    train: object,
    val: object,
    num_classes: int | None,
    input_shape: list[int] | tuple[int, ...] | None,
    source: str,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
) -> Datasets:
    """A user's train and validation datasets, checked, with the DataSpec a model factory needs.

    `num_classes` and `input_shape` given (config or factory) win; otherwise they are read from
    the data: input_shape from the first training input, num_classes from a `classes` list, a
    TensorDataset's integer labels, or the width of float targets (regression, multi-label).
    """
    for role, dataset in (("train", train), ("validation", val)):
        if isinstance(dataset, IterableDataset):
            raise DataError(
                f"{source}: the {role} dataset is an IterableDataset; dist_train needs a map-style Dataset "
                "(__len__ and __getitem__) because exact resume and sharding index samples"
            )
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise DataError(
                f"{source}: the {role} dataset ({type(dataset).__name__}) is not a map-style Dataset "
                "with __len__ and __getitem__"
            )
        if len(dataset) == 0:
            raise DataError(f"{source}: the {role} dataset is empty")
    # The model sees inputs after the transforms: measure one transformed (deterministically
    # where there is an evaluation transform) when the shape is not given.
    transform = eval_transform or train_transform
    shape = tuple(input_shape) if input_shape is not None else _input_shape(train, source, transform)
    classes = num_classes if num_classes is not None else _num_classes(train)
    return Datasets(train, val, train_transform, eval_transform, DataSpec(shape, classes))


def _first_sample(dataset: Dataset, source: str) -> tuple[Any, Any]:
    try:
        sample = dataset[0]
    except Exception as exc:  # noqa: BLE001 - any failure of user code becomes one line
        raise DataError(f"{source}: reading training sample 0 failed: {type(exc).__name__}: {one_line(exc)}") from None
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        raise DataError(f"{source}: a sample must be an (input, target) pair, got {type(sample).__name__}")
    return sample[0], sample[1]


def _input_shape(train: Dataset, source: str, transform: Callable | None) -> tuple[int, ...]:
    inputs, _ = _first_sample(train, source)
    if transform is not None:
        try:
            with torch.random.fork_rng(devices=[]):  # a random transform must not shift model init
                inputs = transform(inputs)
        except Exception as exc:  # noqa: BLE001 - any failure of user code becomes one line
            raise DataError(
                f"{source}: transforming training sample 0 failed: {type(exc).__name__}: {one_line(exc)}"
            ) from None
    return tuple(inputs.shape) if hasattr(inputs, "shape") else ()


def _num_classes(train: Dataset) -> int | None:
    classes = getattr(train, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return len(classes)
    if isinstance(train, TensorDataset) and len(train.tensors) == 2:
        targets = train.tensors[1]
        if targets.ndim == 1:  # class indices, or one regression output
            return 1 if targets.is_floating_point() else int(targets.max()) + 1
        return int(targets[0].numel())  # one column per output or label
    _, target = train[0]
    target = torch.as_tensor(target)
    if target.is_floating_point():
        return max(1, target.numel())
    return None  # integer labels of a generic dataset: scanning them all could take minutes


# What a dataset factory may return beside the two datasets (README, "Your own dataset").
FACTORY_KEYS = ("train", "val", "num_classes", "input_shape", "train_transform", "eval_transform")


def _from_factory(cfg: DataConfig) -> Datasets:
    """data.dataset=package.module:factory: `factory(cfg, **data.kwargs)` returns a mapping
    {"train": Dataset, "val": Dataset} with optionally "num_classes", "input_shape" (what the
    model is built for; data.num_classes/data.input_shape win) and "train_transform",
    "eval_transform" (applied by dist_train, the training one seeded per sample)."""
    name, source = cfg.dataset, f"data.dataset={cfg.dataset}"
    factory = import_object(name, "data.dataset")
    try:
        # Checked apart from the call, so that a TypeError raised inside the factory is not
        # reported as a wrong signature.
        inspect.signature(factory).bind(cfg, **cfg.kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source} must accept (cfg, **data.kwargs) with data.kwargs={cfg.kwargs}: {exc}") from None
    except ValueError:
        pass  # no signature to inspect (a builtin): the call below says what is wrong
    try:
        returned = factory(cfg, **cfg.kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failure of user code becomes one line
        raise DataError(f"{source} raised {type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(returned, Mapping) or not {"train", "val"} <= set(returned):
        got = type(returned).__name__ if not isinstance(returned, Mapping) else f"keys {sorted(map(str, returned))}"
        raise DataError(f"{source} must return a dict with 'train' and 'val' datasets, got {got}")
    unknown = sorted(str(k) for k in returned if k not in FACTORY_KEYS)
    if unknown:
        raise DataError(f"{source} returned unknown key(s) {unknown}; it may return {', '.join(FACTORY_KEYS)}")
    num_classes = cfg.num_classes if cfg.num_classes is not None else returned.get("num_classes")
    input_shape = cfg.input_shape if cfg.input_shape is not None else returned.get("input_shape")
    if num_classes is not None and not (isinstance(num_classes, int) and num_classes >= 1):
        raise DataError(f"{source} returned num_classes={num_classes!r}; it must be a positive integer")
    if input_shape is not None and not (
        isinstance(input_shape, (list, tuple))
        and input_shape
        and all(isinstance(size, int) and size >= 1 for size in input_shape)
    ):
        raise DataError(f"{source} returned input_shape={input_shape!r}; it must be a list of positive sizes")
    for key in ("train_transform", "eval_transform"):
        if returned.get(key) is not None and not callable(returned[key]):
            raise DataError(f"{source} returned a {key} that is not callable: {returned[key]!r}")
    return datasets_from_objects(
        returned["train"],
        returned["val"],
        num_classes,
        input_shape,
        source,
        train_transform=returned.get("train_transform"),
        eval_transform=returned.get("eval_transform"),
    )


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


DOWNLOADABLE = ("cifar10", "mnist")


def build_datasets(cfg: DataConfig, download: bool | None = None) -> Datasets:
    """The named datasets, or a user factory's; `download` (default data.download) fetches
    what is missing."""
    return dataclasses.replace(_build_datasets(cfg, download), origin=f"data.dataset={cfg.dataset}")


def _build_datasets(cfg: DataConfig, download: bool | None) -> Datasets:
    if cfg.dataset == "digits":
        return _digits(cfg)
    if cfg.dataset in DOWNLOADABLE:
        return _torchvision_dataset(cfg, cfg.dataset, cfg.download if download is None else download)
    if cfg.dataset == "image_folder":
        return _image_folder(cfg)
    if cfg.dataset == "synthetic":
        return _synthetic(cfg)
    if cfg.dataset == "text":
        return _text(cfg)
    if cfg.dataset == "tokens":
        return _tokens(cfg)
    if is_import_path(cfg.dataset):
        return _from_factory(cfg)
    raise DataError(f"unknown data.dataset {cfg.dataset!r}")
