"""Models given to dist_train as `user_models:factory`, the way users plug in their own."""

import torch
from torch import nn


def tiny_linear(num_classes: int, input_shape: tuple[int, int, int], bias: bool = True) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes, bias=bias))


def not_a_model(num_classes: int, input_shape: tuple[int, int, int]) -> str:
    return "oops"


class _SqrtOfZero(nn.Module):
    """A finite loss whose gradient is infinite: the update, not the loss, breaks the weights."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = input_shape
        self.linear = nn.Linear(c * h * w, num_classes)
        self.s = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.linear(x.flatten(1)) + torch.sqrt(self.s)


def sqrt_of_zero(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return _SqrtOfZero(num_classes, input_shape)


class _NaNFromCall(nn.Module):
    """A linear model whose output turns NaN from its `bad_call`-th training forward on."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], bad_call: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.linear, self.bad_call, self.calls = nn.Linear(c * h * w, num_classes), bad_call, 0

    def forward(self, x):
        self.calls += self.training
        out = self.linear(x.flatten(1))
        return out * float("nan") if self.calls >= self.bad_call else out


def nan_from_call(num_classes: int, input_shape: tuple[int, int, int], bad_call: int) -> nn.Module:
    return _NaNFromCall(num_classes, input_shape, bad_call)


def wrong_signature(width: int) -> nn.Module:
    return nn.Linear(width, width)


class _Recording(nn.Module):
    """Appends the first value of every training input to record_dir/rank{RANK}.txt: which
    samples each rank consumed, for tests of data coverage across resumes."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], record_dir: str) -> None:
        super().__init__()
        c, h, w = input_shape
        self.linear = nn.Linear(c * h * w, num_classes)
        self.record_dir = record_dir

    def forward(self, x):
        if self.training:
            import os

            with open(f"{self.record_dir}/rank{os.environ.get('RANK', '0')}.txt", "a") as f:
                f.writelines(f"{v!r}\n" for v in x.flatten(1)[:, 0].tolist())
        return self.linear(x.flatten(1))


def recording_linear(num_classes: int, input_shape: tuple[int, int, int], record_dir: str) -> nn.Module:
    return _Recording(num_classes, input_shape, record_dir)


class _NanOnOutliers(nn.Module):
    """NaN logits for any batch whose first input value exceeds 2: some steps, not all."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = input_shape
        self.linear = nn.Linear(c * h * w, num_classes)

    def forward(self, x):
        out = self.linear(x.flatten(1))
        # Not out * nan: where's backward would multiply by NaN even for the kept branch.
        return torch.where(x.flatten(1)[:, 0].max() > 2, torch.full_like(out, float("nan")), out)


def nan_on_outliers(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return _NanOnOutliers(num_classes, input_shape)


class _SleepyRank(nn.Module):
    """Rank 1 sleeps in its 3rd training forward: a hung rank, for collective-timeout tests."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], seconds: float) -> None:
        super().__init__()
        c, h, w = input_shape
        self.linear = nn.Linear(c * h * w, num_classes)
        self.seconds, self.calls = seconds, 0

    def forward(self, x):
        import os
        import time

        self.calls += self.training
        if self.training and self.calls == 3 and os.environ.get("RANK") == "1":
            time.sleep(self.seconds)
        return self.linear(x.flatten(1))


def sleepy_rank(num_classes: int, input_shape: tuple[int, int, int], seconds: float = 30.0) -> nn.Module:
    return _SleepyRank(num_classes, input_shape, seconds)


class _Aborting(nn.Module):
    """Writes the worker's TORCH_* environment to env_file as JSON, then aborts (SIGABRT) in
    its first training forward: how a rank ends when the NCCL watchdog gives up on a collective."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], env_file: str) -> None:
        super().__init__()
        c, h, w = input_shape
        self.linear, self.env_file = nn.Linear(c * h * w, num_classes), env_file

    def forward(self, x):
        if self.training:
            import json
            import os

            with open(self.env_file, "w") as f:
                json.dump({k: v for k, v in os.environ.items() if k.startswith("TORCH_")}, f)
            os.abort()
        return self.linear(x.flatten(1))


def aborting(num_classes: int, input_shape: tuple[int, int, int], env_file: str) -> nn.Module:
    return _Aborting(num_classes, input_shape, env_file)


class _NoLayers(nn.Module):
    """A linear classifier as a bare matrix: no Linear or Conv layer for pruning to find."""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = input_shape
        self.matrix = nn.Parameter(torch.randn(c * h * w, num_classes) * 0.01)

    def forward(self, x):
        return x.flatten(1) @ self.matrix


def no_layers(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return _NoLayers(num_classes, input_shape)


def conv_only(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """No Linear layer: a model int8-dynamic and int8-weight-only have nothing to quantize in."""
    return nn.Sequential(nn.Conv2d(input_shape[0], num_classes, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class _DataDependent(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = input_shape
        self.linear = nn.Linear(c * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.flatten(1))
        return out if out.sum() > 0 else -out  # a branch on values: torch.export cannot trace it


def data_dependent(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return _DataDependent(num_classes, input_shape)


def bn_convnet(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """A small convnet with BatchNorm, whose running statistics change in every training forward."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def signal_at_call(num_classes: int, input_shape: tuple[int, int, int], call: int, signal_name: str) -> nn.Module:
    """bn_convnet that sends this process `signal_name` in its `call`-th forward, as SLURM would."""
    import os
    import signal

    model, calls = bn_convnet(num_classes, input_shape), [0]

    def count(module: nn.Module, args: tuple) -> None:
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), getattr(signal, signal_name))

    model.register_forward_pre_hook(count)
    return model


class _ResidualBlock(nn.Module):
    """torchvision's BasicBlock in small: one nn.ReLU called twice, after bn1 and after the add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def residual_convnet(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 8, 3, padding=1),
        nn.ReLU(),
        _ResidualBlock(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )
