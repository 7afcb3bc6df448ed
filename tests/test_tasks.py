"""Tasks own the loss and the validation metrics: each against torch's own functions, and
through the real CLI on the digits job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, metrics_records, run_cli, tiny_overrides
from torch import nn

import dist_train
from dist_train.config import ConfigError, TrainConfig, load_config
from dist_train.tasks import build_task


def _evaluate(task, model, *batches) -> dict[str, float]:
    """One process's evaluation pass over `batches` of (inputs, targets), as evaluate() makes it."""
    evaluation = task.evaluation()
    for inputs, targets in batches:
        evaluation.update(*task.eval_forward(model, inputs, targets), targets)
    evaluation.all_reduce(lambda flat: flat)  # one process: the sums are its own
    return evaluation.compute()


@pytest.mark.unit
def test_cross_entropy_with_label_smoothing_matches_torch_and_counts_tokens():
    task = build_task(TrainConfig(label_smoothing=0.1))
    logits, targets = torch.randn(4, 5, 7), torch.randint(0, 7, (4, 5))  # (batch, seq, vocab) tokens
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(task.loss(nn.Identity(), logits, targets), expected)
    loss_sum, count, _ = task.eval_forward(nn.Identity(), logits, targets)
    assert count == 20 and loss_sum.item() / count == pytest.approx(expected.item(), rel=1e-5)
    values = _evaluate(task, nn.Identity(), (logits[:3], targets[:3]), (logits[3:], targets[3:]))
    # Token sequences stay cheap by default: accuracy alone, over every token.
    assert list(values) == ["val_loss", "val_acc"]
    assert values["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert values["val_acc"] == (logits.argmax(-1) == targets).sum().item() / 20


@pytest.mark.unit
def test_classes_get_top5_macro_scores_and_a_confusion_matrix_by_default(tmp_path):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

    task = build_task(TrainConfig())
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 8, (90,), generator=g)
    logits = torch.randn(90, 8, generator=g) + 2.0 * F.one_hot(targets, 8)  # mostly right, not always
    values = _evaluate(task, nn.Identity(), *zip(logits.split(25), targets.split(25), strict=True))
    assert list(values) == ["val_loss", "val_acc", "val_top5", "val_precision", "val_recall", "val_f1"]
    predicted = logits.argmax(1).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(targets, predicted, average="macro", zero_division=0)
    assert values["val_acc"] == pytest.approx((predicted == targets.numpy()).mean(), abs=1e-12)
    assert values["val_top5"] == pytest.approx(top_k_accuracy_score(targets, logits.numpy(), k=5), abs=1e-12)
    assert 0.4 < values["val_acc"] < values["val_top5"] < 1
    assert (values["val_precision"], values["val_recall"], values["val_f1"]) == pytest.approx((precision, recall, f1))
    assert values["val_loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    # Five classes or fewer: no top-5 (it would be 1); more than 100: no confusion matrix.
    assert "val_top5" not in _evaluate(task, nn.Identity(), (logits[:, :5], targets.clamp(max=4)))
    evaluation = task.evaluation()
    evaluation.update(*task.eval_forward(nn.Identity(), logits, targets), targets)
    written = evaluation.save(tmp_path, "step_00000001")
    assert written == [tmp_path / "confusion" / f"step_00000001.{ext}" for ext in ("csv", "png")]
    saved = np.loadtxt(tmp_path / "confusion" / "step_00000001.csv", delimiter=",", skiprows=1, dtype=np.int64)
    assert (saved[:, 0] == np.arange(8)).all()
    assert (saved[:, 1:] == confusion_matrix(targets, predicted)).all()
    assert (tmp_path / "confusion" / "step_00000001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wide = task.evaluation()
    wide.update(torch.zeros(()), 4, torch.randn(4, 101), torch.arange(4))
    assert wide.save(tmp_path, "wide") == []


@pytest.mark.unit
def test_multilabel_bce_counts_every_label_and_thresholds_logits_at_zero():
    task = build_task(TrainConfig(loss="bce_with_logits"))
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(
        task.loss(nn.Identity(), logits, targets), F.binary_cross_entropy_with_logits(logits, targets)
    )
    values = _evaluate(task, nn.Identity(), (logits, targets))
    assert list(values) == ["val_loss", "val_acc"]
    assert values["val_acc"] == 4 / 6  # wrong: row 0 label 2 and row 1 label 2
    # Logits that all lie in [0, 1] are still logits: 0.3 > 0 predicts the label.
    assert _evaluate(task, nn.Identity(), (torch.full((2, 3), 0.3), torch.ones(2, 3)))["val_acc"] == 1.0


@pytest.mark.unit
@pytest.mark.parametrize(("name", "fn"), [("mse", F.mse_loss), ("l1", F.l1_loss)])
def test_regression_losses_take_a_one_output_head_against_flat_targets(name, fn):
    task = build_task(TrainConfig(loss=name))
    outputs, targets = torch.randn(6, 1), torch.randn(6)
    torch.testing.assert_close(task.loss(nn.Identity(), outputs, targets), fn(outputs.squeeze(1), targets))
    values = _evaluate(task, nn.Identity(), (outputs[:4], targets[:4]), (outputs[4:], targets[4:]))
    assert list(values) == ["val_loss", "val_mae"]
    assert values["val_mae"] == pytest.approx((outputs.squeeze(1) - targets).abs().mean().item(), rel=1e-5)
    assert values["val_loss"] == pytest.approx(fn(outputs.squeeze(1), targets).item(), rel=1e-5)


@pytest.mark.unit
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
    values = _evaluate(task, model, (x, y))
    assert values["val_acc"] == (model.linear(x).argmax(1) == y).sum().item() / 5


@pytest.mark.unit
def test_unknown_losses_and_metrics_are_config_errors():
    with pytest.raises(ConfigError, match="train.loss must be one of cross_entropy"):
        load_config(None, ["train.max_steps=1", "train.loss=hinge"])
    with pytest.raises(ConfigError, match=r"train.metrics\[0\] must be one of accuracy, top5, precision, recall"):
        load_config(None, ["train.max_steps=1", "train.metrics=[auroc]"])
    with pytest.raises(ConfigError, match="train.metrics: top5 needs at least 5 classes; the model outputs 3"):
        _evaluate(build_task(TrainConfig(metrics=["top5"])), nn.Identity(), (torch.randn(2, 3), torch.tensor([0, 2])))
    with pytest.raises(ConfigError, match="train.metrics: confusion needs class-index targets"):
        _evaluate(
            build_task(TrainConfig(loss="bce_with_logits", metrics=["confusion"])),
            nn.Identity(),
            (torch.randn(2, 3), torch.ones(2, 3)),
        )
    with pytest.raises(ConfigError, match="train.label_smoothing applies to train.loss=cross_entropy only"):
        load_config(None, ["train.max_steps=1", "train.loss=mse", "train.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="train.loss=user_losses:nope: user_losses has no callable 'nope'"):
        build_task(TrainConfig(loss="user_losses:nope"))


@pytest.mark.system
def test_a_user_loss_on_the_cli_trains_and_reports_only_the_metrics_asked_for(tmp_path):
    common = tiny_overrides(tmp_path, **{"train.loss": "tests.user_losses:cross_entropy_times_two"})
    proc = run_cli("train", "configs/digits.yaml", *common, "run.name=plain", cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ", loss tests.user_losses:cross_entropy_times_two" in proc.stdout
    evals = [r for r in metrics_records(tmp_path / "runs" / "plain") if "val_loss" in r]
    assert evals and all("val_acc" not in r for r in evals)
    dist_train.fit("configs/digits.yaml", [*common, "run.name=acc", "train.metrics=[accuracy]"])  # in this process
    evals = [r for r in metrics_records(tmp_path / "runs" / "acc") if "val_loss" in r]
    assert 0 <= evals[-1]["val_acc"] <= 1


@pytest.mark.system
def test_resuming_with_another_loss_is_a_one_line_error(tmp_path):
    dist_train.fit("configs/digits.yaml", tiny_overrides(tmp_path))  # in this process; the CLI's refusal below
    longer = tiny_overrides(tmp_path, **{"train.max_steps": 8, "train.loss": "mse"})
    proc = run_cli("train", "configs/digits.yaml", *longer, cwd=REPO)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "written with train.loss=cross_entropy, this run has mse" in proc.stderr
