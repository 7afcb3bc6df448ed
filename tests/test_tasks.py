"""Tasks own the loss and the validation metrics: each against torch's own functions, and
through the real CLI on the digits job."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_cli, tiny_overrides
from torch import nn

from dist_train.config import ConfigError, TrainConfig, load_config
from dist_train.tasks import build_task


def _totals(task, model, inputs, targets) -> list[float]:
    return [float(torch.as_tensor(v).detach()) for v in task.eval_totals(model, inputs, targets)]


def test_cross_entropy_with_label_smoothing_matches_torch_and_counts_tokens():
    task = build_task(TrainConfig(label_smoothing=0.1))
    logits, targets = torch.randn(4, 5, 7), torch.randint(0, 7, (4, 5))  # (batch, seq, vocab) tokens
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(task.loss(nn.Identity(), logits, targets), expected)
    loss_sum, count, correct, seen = _totals(task, nn.Identity(), logits, targets)
    assert count == seen == 20
    assert loss_sum / count == pytest.approx(expected.item(), rel=1e-5)
    assert correct == (logits.argmax(-1) == targets).sum().item()
    assert task.metric_names() == ["val_loss", "val_acc"]


def test_multilabel_bce_counts_every_label_and_thresholds_logits_at_zero():
    task = build_task(TrainConfig(loss="bce_with_logits"))
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(
        task.loss(nn.Identity(), logits, targets), F.binary_cross_entropy_with_logits(logits, targets)
    )
    loss_sum, count, correct, seen = _totals(task, nn.Identity(), logits, targets)
    assert (count, seen, correct) == (6, 6, 4)  # wrong: row 0 label 2 and row 1 label 2


@pytest.mark.parametrize(("name", "fn"), [("mse", F.mse_loss), ("l1", F.l1_loss)])
def test_regression_losses_take_a_one_output_head_against_flat_targets(name, fn):
    task = build_task(TrainConfig(loss=name))
    outputs, targets = torch.randn(6, 1), torch.randn(6)
    torch.testing.assert_close(task.loss(nn.Identity(), outputs, targets), fn(outputs.squeeze(1), targets))
    loss_sum, count, abs_sum, seen = _totals(task, nn.Identity(), outputs, targets)
    assert task.metric_names() == ["val_loss", "val_mae"]
    assert abs_sum / seen == pytest.approx((outputs.squeeze(1) - targets).abs().mean().item(), rel=1e-5)


def test_a_model_may_return_its_own_loss():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x, y):
            logits = self.linear(x)
            return {"loss": F.cross_entropy(logits, y), "logits": logits}

    model, x, y = WithLoss(), torch.randn(5, 3), torch.randint(0, 2, (5,))
    task = build_task(TrainConfig(loss="model", metrics=["accuracy"]))
    torch.testing.assert_close(task.loss(model, x, y), F.cross_entropy(model.linear(x), y))
    loss_sum, count, correct, seen = _totals(task, model, x, y)
    assert count == seen == 5 and correct == (model.linear(x).argmax(1) == y).sum().item()


def test_unknown_losses_and_metrics_are_config_errors():
    with pytest.raises(ConfigError, match="train.loss must be one of cross_entropy"):
        load_config(None, ["train.max_steps=1", "train.loss=hinge"])
    with pytest.raises(ConfigError, match=r"train.metrics\[0\] must be one of accuracy, mae, mse"):
        load_config(None, ["train.max_steps=1", "train.metrics=[f1]"])
    with pytest.raises(ConfigError, match="train.label_smoothing applies to train.loss=cross_entropy only"):
        load_config(None, ["train.max_steps=1", "train.loss=mse", "train.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="train.loss=user_losses:nope: user_losses has no callable 'nope'"):
        build_task(TrainConfig(loss="user_losses:nope"))


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_user_loss_on_the_cli_trains_and_reports_only_the_metrics_asked_for(tmp_path):
    common = tiny_overrides(tmp_path, **{"train.loss": "tests.user_losses:cross_entropy_times_two"})
    proc = run_cli("train", "configs/digits.yaml", *common, "run.name=plain", cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ", loss tests.user_losses:cross_entropy_times_two" in proc.stdout
    evals = [r for r in _metrics(tmp_path / "runs" / "plain") if "val_loss" in r]
    assert evals and all("val_acc" not in r for r in evals)
    proc = run_cli("train", "configs/digits.yaml", *common, "run.name=acc", "train.metrics=[accuracy]", cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = [r for r in _metrics(tmp_path / "runs" / "acc") if "val_loss" in r]
    assert 0 <= evals[-1]["val_acc"] <= 1


def test_resuming_with_another_loss_is_a_one_line_error(tmp_path):
    assert run_cli("train", "configs/digits.yaml", *tiny_overrides(tmp_path), cwd=REPO).returncode == 0
    longer = tiny_overrides(tmp_path, **{"train.max_steps": 8, "train.loss": "mse"})
    proc = run_cli("train", "configs/digits.yaml", *longer, cwd=REPO)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "written with train.loss=cross_entropy, this run has mse" in proc.stderr
