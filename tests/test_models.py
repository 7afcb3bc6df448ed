"""Model registry: built-ins adapt to the dataset's shape; user factories plug in."""

from __future__ import annotations

import pytest
import torch

from dist_train.config import ConfigError, ModelConfig
from dist_train.data import DataSpec
from dist_train.models import SeedCNN, build_model

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", ["seed_cnn", "mlp", "resnet18"])
def test_builtin_models_fit_the_input(name, shape):
    model = build_model(ModelConfig(name=name), DataSpec(shape, 7))
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_seed_cnn_is_the_classic_layout_on_cifar():
    model = SeedCNN(3, 32, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [6, 16]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(400, 120), (120, 84), (84, 10)]


def test_resnet50_and_imagenet_stem():
    model = build_model(ModelConfig(name="resnet50", small_input_stem=False), DataSpec((1, 64, 64), 3))
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_user_factory_gets_shape_and_kwargs():
    model = build_model(ModelConfig(name="user_models:tiny_linear", kwargs={"bias": False}), DataSpec((1, 4, 4), 3))
    assert model[1].in_features == 16 and model[1].bias is None


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_such_module:f", "cannot import"),
        ("user_models:missing", "no callable"),
        ("user_models:not_a_model", "not an nn.Module"),
        ("vgg11", "must be one of"),
        ("user_models:wrong_signature", "must accept"),
        (":foo", "cannot import"),
    ],
)
def test_bad_model_names(name, message):
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(name=name), DataSpec((1, 8, 8), 10))
