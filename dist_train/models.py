"""Model registry: built-in image classifiers and user models given as `package.module:factory`."""

from __future__ import annotations

import torch
from torch import nn

from dist_train.config import ConfigError, ModelConfig, import_object
from dist_train.data import DataSpec
from dist_train.gpt import GPT


class SeedCNN(nn.Module):
    """The classic CIFAR-10 LeNet-style CNN: conv 6 -> conv 16 -> fc 120 -> 84 -> classes.

    At 28px and above the 5x5 convolutions are unpadded as in the original; smaller images
    (digits are 8x8) get 'same' padding so two pooling stages still leave a feature map.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        pad = 0 if image_size >= 28 else 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size
        for _ in range(2):
            side = (side + 2 * pad - 4) // 2
        if side < 1:
            raise ConfigError(f"model.name=seed_cnn needs images of at least 4px, got {image_size}px")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _resnet(depth: int, cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    from torchvision import models

    model = {18: models.resnet18, 50: models.resnet50}[depth](weights=None, num_classes=spec.num_classes)
    in_channels = spec.input_shape[0]
    if cfg.small_input_stem:
        # For 32x32 images the ImageNet stem (7x7 stride 2 + max-pool) throws away 4x resolution.
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


BUILTIN = ("seed_cnn", "mlp", "resnet18", "resnet50", "gpt")


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    if spec.num_classes is None:
        raise ConfigError(
            f"model.name={cfg.name} needs the number of classes or outputs: set data.num_classes "
            "(the dataset does not say, and its labels are not scanned)"
        )
    if cfg.name == "gpt":
        if len(spec.input_shape) != 1:
            raise ConfigError("model.name=gpt needs token sequences: use data.dataset=text or tokens")
        return GPT(spec.num_classes, spec.input_shape[0], cfg.n_layer, cfg.n_head, cfg.width, cfg.dropout)
    if ":" not in cfg.name and len(spec.input_shape) != 3:
        raise ConfigError(f"model.name={cfg.name} needs images; for data.dataset=text use model.name=gpt")
    if ":" in cfg.name:
        return _user_model(cfg, spec)
    c, h, w = spec.input_shape
    if cfg.name == "seed_cnn":
        return SeedCNN(c, min(h, w), spec.num_classes)
    if cfg.name == "mlp":
        return MLP(c * h * w, cfg.mlp_hidden, spec.num_classes)
    if cfg.name in ("resnet18", "resnet50"):
        return _resnet(int(cfg.name[6:]), cfg, spec)
    raise ConfigError(f"model.name must be one of {', '.join(BUILTIN)} or 'package.module:factory'; got {cfg.name!r}")


def _user_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    factory = import_object(cfg.name, "model.name")
    try:
        model = factory(num_classes=spec.num_classes, input_shape=spec.input_shape, **cfg.kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"model.name={cfg.name} must accept (num_classes, input_shape, **model.kwargs): {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name={cfg.name} returned {type(model).__name__}, not an nn.Module")
    return model
