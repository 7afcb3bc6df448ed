"""dist_train.fit from a user's script: objects win over config names, 2 ranks equal 1,
resume through the same call, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli_env
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

import dist_train
from dist_train import checkpoint
from dist_train.errors import ConfigError, UserError


def _script(tmp_path, task: str, nproc: int | None, *overrides: str, fresh: bool = False) -> dict:
    """tests/api_script.py under torchrun with `nproc` gloo processes, or alone (None): in this
    process, or with `fresh` in a plain python of its own (a resume from a new process)."""
    out = tmp_path / f"{task}-{nproc}.json"
    if nproc is None and not fresh:
        import api_script

        api_script.run(str(out), task, [f"run.output_dir={tmp_path / 'runs'}", *overrides])
        return json.loads(out.read_text())
    launcher = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run"]
    launcher += [] if nproc is None else ["--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run(
        [*launcher, "tests/api_script.py", str(out), task, f"run.output_dir={tmp_path / 'runs'}", *overrides],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _weights(found: dict) -> dict[str, torch.Tensor]:
    from pathlib import Path

    return checkpoint.read_full_state(Path(found["checkpoint"]), "model")


@pytest.mark.system
@pytest.mark.parametrize(("task", "strategy"), [("multilabel", "ddp"), ("regression", "fsdp")])
def test_two_ranks_under_torchrun_equal_one_process_with_accumulation(tmp_path, task, strategy):
    # Each rank seeds its model differently (the script does): equal results prove rank 0's
    # weights reached every rank, which FSDP, unlike DDP, would not do by itself.
    two = _script(tmp_path, task, 2, f"run.name={task}-2", f"parallel.strategy={strategy}")
    one = _script(tmp_path, task, None, f"run.name={task}-1", "train.grad_accum_steps=2")
    assert two["step"] == one["step"] == 12
    a, b = _weights(two), _weights(one)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # Float targets evaluated over 203 samples on 2 ranks: the same sums as on one.
    assert (
        two["eval"].keys()
        == one["eval"].keys()
        == {
            "multilabel": {"val_loss", "val_acc"},
            "regression": {"val_loss", "val_mae"},
        }[task]
    )
    for name in one["eval"]:
        assert two["eval"][name] == pytest.approx(one["eval"][name], rel=1e-4)


@pytest.mark.system
def test_a_python_loss_function_gets_loss_only_and_the_run_resumes_through_the_same_call(tmp_path):
    straight = _script(tmp_path, "custom", None, "run.name=straight")
    first = _script(tmp_path, "custom", None, "run.name=split", "train.stop_at_step=5")
    assert first["step"] == 5
    resumed = _script(tmp_path, "custom", None, "run.name=split", fresh=True)  # a new process resumes
    assert resumed["step"] == 12
    assert set(straight["eval"]) == {"val_loss"}  # no accuracy for a loss we know nothing of
    a, b = _weights(straight), _weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight["eval"] == resumed["eval"]


def _digits_config(tmp_path) -> dict:
    return {
        "run": {"output_dir": str(tmp_path / "runs"), "name": "api"},
        "train": {"max_steps": 4, "log_every": 2, "eval_every": 0, "progress_bar": False},
        "data": {"batch_size": 16},
        "checkpoint": {"every_steps": 0},
    }


@pytest.mark.system
def test_fit_takes_a_yaml_path_a_mapping_or_a_config_with_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    by_dict = dist_train.fit(_digits_config(tmp_path), ["run.name=by-dict"])
    by_path = dist_train.fit(
        "configs/digits.yaml",
        [f"run.output_dir={tmp_path / 'runs'}", "run.name=by-path", "train.max_steps=4", "train.max_epochs=null"]
        + ["train.progress_bar=false", "checkpoint.every_steps=0", "data.batch_size=16", "logging.wandb.mode=disabled"],
    )
    cfg = dist_train.load_config(_digits_config(tmp_path), ["run.name=by-config"])
    by_config = dist_train.fit(cfg)
    assert by_dict.step == by_path.step == by_config.step == 4
    assert (tmp_path / "runs" / "by-config" / "config.yaml").is_file()
    with pytest.raises(ConfigError, match="unknown config key train.lr; did you mean optim.lr"):
        dist_train.fit({"train": {"lr": 0.1}})
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        dist_train.fit(_digits_config(tmp_path), ["optim.lr=-1"])


@pytest.mark.unit
def test_a_model_object_wins_over_model_name(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    result = dist_train.fit(_digits_config(tmp_path), ["model.name=resnet50"], model=model)
    assert set(checkpoint.read_full_state(result.checkpoint, "model")) == {"1.weight", "1.bias"}


@pytest.mark.unit
def test_bad_objects_are_one_line_errors(tmp_path):
    data = TensorDataset(torch.randn(64, 4), torch.randn(64))
    with pytest.raises(ConfigError, match="train_data and val_data together"):
        dist_train.fit(_digits_config(tmp_path), train_data=data)
    with pytest.raises(ConfigError, match="must be a torch.nn.Module"):
        dist_train.fit(_digits_config(tmp_path), model="resnet18")

    class Stream(IterableDataset):
        def __iter__(self):
            yield from data

    small = TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(UserError, match="the dataset given to dist_train.fit has 8 training samples, fewer than"):
        dist_train.fit(_digits_config(tmp_path), train_data=small, val_data=small)
    with pytest.raises(UserError, match="map-style") as caught:
        dist_train.fit(_digits_config(tmp_path), train_data=Stream(), val_data=data)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "runs").exists()  # nothing written for a run that never started


@pytest.mark.system
def test_the_readme_example_script_trains_the_digits(tmp_path):
    proc = subprocess.run(
        [sys.executable, "examples/fit_api.py", f"run.output_dir={tmp_path}", "train.max_epochs=3"]
        + ["train.progress_bar=false", "parallel.strategy=none"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = proc.stdout.strip().splitlines()[-1]
    assert final.startswith("step 132: ")  # 1,437 samples / batch 32 = 44 steps a epoch
    assert json.loads(final.split(": ", 1)[1].replace("'", '"'))["val_acc"] > 0.9
