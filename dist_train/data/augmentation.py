"""Training-time augmentation whose randomness is a function of each sample's key, so that it
does not depend on batches, loader workers or where a run resumed."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def torchvision_pipeline(
    *, size: int, pad: int, flip: bool, mean: tuple, std: tuple, augment: bool
) -> tuple[Callable, Callable]:
    """(train, eval) torchvision v2 transforms of PIL images: random crop with padding, optional
    flip, normalize."""
    from torchvision.transforms import v2

    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    normalize = [v2.Normalize(mean, std)]
    random_ops = [v2.RandomCrop(size, padding=pad)] + ([v2.RandomHorizontalFlip()] if flip else [])
    train = v2.Compose(to_tensor + (random_ops if augment else []) + normalize)
    return train, v2.Compose(to_tensor + normalize)


class RandomShift:
    """Translate images by up to `pad` pixels each way, filling with `fill`, and with `flip`
    mirror half of them left to right: what torchvision's RandomCrop(size, padding=pad,
    fill=fill) and RandomHorizontalFlip do, applied to a whole batch at once, to float or
    uint8 images alike. The offsets and the flip are a hash of each sample's key, so a sample's
    augmentation does not depend on the batch it is in. Per sample through torchvision this
    cost about 150 us and was most of the digits job's step; a batch of 32 here costs about as
    much as one sample did."""

    def __init__(self, pad: int, fill: float, flip: bool = False) -> None:
        self.pad, self.fill, self.flip = pad, fill, flip

    def keyed(self, images: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        """images (batch, channels, height, width) on the CPU, one integer key per image."""
        # NumPy: a handful of small array operations cost less than the same ones through torch.
        batch, channels, height, width = images.shape
        mixed = _splitmix64(np.asarray(keys, dtype=np.uint64))
        span = np.uint64(2 * self.pad + 1)
        top, left = (mixed % span).astype(np.intp), ((mixed >> np.uint64(32)) % span).astype(np.intp)
        source = images.numpy()
        padded = np.full((batch, channels, height + 2 * self.pad, width + 2 * self.pad), self.fill, dtype=source.dtype)
        padded[:, :, self.pad : self.pad + height, self.pad : self.pad + width] = source
        # Every (top, left) window of every image as a view, (batch, channels, span, span, h, w).
        windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(2, 3))
        shifted = windows[np.arange(batch), :, top, left]  # a copy: advanced indexing
        if self.flip:
            # A second round of mixing gives a bit independent of the offsets' bits.
            mirrored = (_splitmix64(mixed) & np.uint64(1)).astype(bool)
            shifted[mirrored] = shifted[mirrored][..., ::-1]
        return torch.from_numpy(shifted)


def _splitmix64(keys: np.ndarray) -> np.ndarray:
    """Well-mixed 64-bit values from integer keys (uint64 arithmetic wraps, as intended)."""
    with np.errstate(over="ignore"):
        x = keys + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
