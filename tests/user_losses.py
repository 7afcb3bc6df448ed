"""Losses given to dist_train as `tests.user_losses:fn` (run from the repository root), as users plug in theirs."""

import torch
import torch.nn.functional as F


def smooth_l1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(outputs.float().reshape(targets.shape), targets.float())


def cross_entropy_times_two(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 2 * F.cross_entropy(outputs.float(), targets)
