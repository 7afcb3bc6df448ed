"""find-batch (dist_train/batch_finder.py) on the digits job, through torchrun's 2 gloo ranks
where the decisions must be collective, and data.batch_size=auto with train.global_batch in
training and on resume."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli_env, tiny_overrides

import dist_train
from dist_train.batch_finder import OOM_ABOVE_ENV, OOM_RANK_ENV, find_batch
from dist_train.config import ConfigError, load_config

DIGITS = str(REPO / "configs" / "digits.yaml")
TWO_RANKS = ("--nproc-per-node", "2")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for the in-process runs, as cli_env gives the subprocesses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_find_batch_on_two_ranks_agrees_when_only_rank_1_runs_out():
    env = {**cli_env(), OOM_ABOVE_ENV: "200", OOM_RANK_ENV: "1"}
    command = [sys.executable, "-m", "dist_train.cli", "find-batch", "configs/digits.yaml", *TWO_RANKS]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _output(proc)
    trials = dict(re.findall(r"^\s+(\d+)  (fits|does not fit on rank [\d, ]+)", proc.stdout, re.MULTILINE))
    assert trials["200"] == "fits" and trials["201"] == "does not fit on rank 1", _output(proc)
    assert trials["256"] == "does not fit on rank 1"  # rank 0 fitted it; both went on from the failure
    assert all(result in ("fits", "does not fit on rank 1") for result in trials.values())
    found = int(re.search(r"^use: data\.batch_size=(\d+)$", proc.stdout, re.MULTILINE).group(1))
    assert 170 <= found <= 190  # 200, less about 10% headroom
    assert f"global batch {2 * found} (2 x {found} x 1 accumulation)" in proc.stdout


def test_a_cpu_memory_cap_bounds_the_estimate(capsys):
    cfg = load_config(DIGITS, ["data.max_memory_gb=0.001", "logging.wandb.mode=disabled"])
    found = find_batch(cfg)
    capsys.readouterr()
    fitted = [t for t in found.trials if t.ok]
    assert fitted and all(t.used_gb is not None and t.used_gb <= 0.001 for t in fitted)
    assert found.first_failure is not None and found.micro_batch < found.largest_fit < found.first_failure
    failed = next(t for t in found.trials if t.size == found.first_failure)
    assert failed.used_gb > 0.001
    by_size = sorted((t.size, t.used_gb) for t in found.trials)
    assert all(a[1] < b[1] for a, b in zip(by_size, by_size[1:], strict=False))  # grows with the batch


def test_auto_batch_makes_up_the_global_batch_and_resumes_with_it(tmp_path, monkeypatch, capsys):
    """Out of memory above 50: the search finds 50, keeps 45 with headroom, and trains with 32, the
    largest size up to that which divides the 96 samples of train.global_batch (x 3 accumulation).
    The resume keeps 32 from the checkpoint although a new search would now find 9."""
    overrides = tiny_overrides(tmp_path, **{"data.batch_size": "auto", "train.global_batch": 96})
    monkeypatch.setenv(OOM_ABOVE_ENV, "50")
    dist_train.fit(DIGITS, [*overrides, "train.stop_at_step=3"])
    first = capsys.readouterr().out
    assert "data.batch_size=auto: micro-batch 45 per rank (50 fits, 51 does not" in first, first
    assert "training 6 steps of global batch 96 (1 x 32 x 3 accumulation)" in first, first
    monkeypatch.setenv(OOM_ABOVE_ENV, "10")
    result = dist_train.fit(DIGITS, overrides)
    second = capsys.readouterr().out
    assert "data.batch_size=auto: micro-batch 32 per rank, kept from the checkpoint" in second, second
    assert "resumed from" in second and "global batch 96 (1 x 32 x 3 accumulation)" in second, second
    assert result.step == 6


def test_batch_settings_are_checked():
    assert load_config(DIGITS, ["data.batch_size=auto"]).data.batch_size == "auto"
    for overrides, key in (
        (["data.batch_size=big"], "data.batch_size"),
        (["train.global_batch=64", "train.grad_accum_steps=2"], "train.grad_accum_steps"),
        (["data.max_memory_gb=0"], "data.max_memory_gb"),
    ):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(DIGITS, overrides)


def test_a_global_batch_that_does_not_divide_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.global_batch=100 is not a multiple of 1 processes x data\.batch"):
        dist_train.fit(DIGITS, tiny_overrides(tmp_path, **{"train.global_batch": 100}))
    assert not (tmp_path / "runs").exists()
