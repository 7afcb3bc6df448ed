"""Asynchronous checkpoints (checkpoint.async_save, dist_train/checkpoint/async_save.py): the same
checkpoints as synchronous saves, bit for bit (BatchNorm buffers included), made visible only
once complete; a failed background write fails the run in one line and resume skips it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, launch_runs, logged, metrics_records, tiny_overrides

from dist_train import checkpoint
from dist_train.checkpoint.async_save import FAIL_WRITE_AT_STEP, HOST_MEMORY_GB
from dist_train.cli import main

CONFIG = str(REPO / "configs" / "digits.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


def _values(**extra: object) -> dict[str, object]:
    return {
        "model.name": "tests.user_models:bn_convnet",
        "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 10,
        **extra,
    }


def _overrides(root: Path, name: str, **extra: object) -> list[str]:
    return tiny_overrides(root, **_values(**{"run.name": name, **extra}))


def _everything(step_dir: Path) -> dict[str, object]:
    """A checkpoint's contents: model and optimizer tensors, train state, every rank's RNG."""
    found: dict[str, object] = {f"model.{k}": v for k, v in checkpoint.read_full_state(step_dir, "model").items()}
    found |= {f"optim.{k}": v for k, v in checkpoint.read_full_state(step_dir, "optim").items()}
    state = checkpoint.load_train_state(step_dir)
    for differs in ("config", "wandb_run_id"):  # run.name, checkpoint.async_save; a fresh id per run
        state.pop(differs)
    found["train_state"] = state
    for rng in sorted(step_dir.glob("rng_rank*.pt")):
        found[rng.name] = torch.load(rng, weights_only=True)
    return found


def _assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.system
def test_async_checkpoints_equal_sync_ones_bit_for_bit(tmp_path, capsys):
    """Saved every 2 steps of 6 while training goes on: BatchNorm's running statistics change in
    the very next forward, so staging after it would show here."""
    for name, async_save in (("sync", False), ("async", True)):
        assert main(["train", CONFIG, *_overrides(tmp_path, name, **{"checkpoint.async_save": async_save})]) == 0
    runs = tmp_path / "runs"
    for step in (2, 4, 6):
        sync_dir, async_dir = (checkpoint.step_dir(runs / name / "checkpoints", step) for name in ("sync", "async"))
        checkpoint.verify(async_dir)  # its manifest was written after the background write finished
        _assert_same(_everything(async_dir), _everything(sync_dir), f"step {step}")
    assert logged(runs / "async", "loss") == logged(runs / "sync", "loss")
    assert not list((runs / "async" / "checkpoints").glob("*.partial"))
    stalls = metrics_records(runs / "async")
    assert [row["step"] for row in stalls if "checkpoint_stall_s" in row] == [2, 4, 6]


@pytest.mark.system
def test_where_a_stager_cannot_stage_twice_each_save_has_its_own(tmp_path, monkeypatch, capsys):
    """torch 2.11 and 2.12's stager fails its second save (it clears its copy table after each):
    there every save stages through a new stager, closed once that save is written."""
    import dist_train.checkpoint.async_save as async_checkpoint

    made, closed = [], []
    pinned_stager = async_checkpoint._pinned_stager

    def counted():
        stager = pinned_stager()
        close = stager.close
        stager.close = lambda: (closed.append(stager), close())[1]
        made.append(stager)
        return stager

    monkeypatch.setattr(async_checkpoint, "_stager_reusable", lambda: False)
    monkeypatch.setattr(async_checkpoint, "_pinned_stager", counted)
    assert main(["train", CONFIG, *_overrides(tmp_path, "fresh", **{"checkpoint.async_save": True})]) == 0
    assert main(["train", CONFIG, *_overrides(tmp_path, "sync")]) == 0
    assert len(made) == 2 and closed == made  # steps 2 and 4 (6, the last, is saved synchronously)
    runs = tmp_path / "runs"
    for step in (2, 4, 6):
        fresh, sync = (checkpoint.step_dir(runs / name / "checkpoints", step) for name in ("fresh", "sync"))
        _assert_same(_everything(fresh), _everything(sync), f"step {step}")


@pytest.mark.system
def test_a_failed_background_write_fails_the_run_and_resume_skips_it(tmp_path, monkeypatch, capsys):
    """The write of step 4 fails (the hook raises what a full disk would): the run stops at the
    next boundary (step 6) with one line, step 4 stays .partial, and the same command resumes
    from step 2 and ends exactly where an uninterrupted run does."""
    overrides = _overrides(tmp_path, "failing", **{"checkpoint.async_save": True})
    monkeypatch.setenv(FAIL_WRITE_AT_STEP, "4")
    assert main(["train", CONFIG, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    partial = tmp_path / "runs" / "failing" / "checkpoints" / "step_00000004.partial"
    assert err == (
        "error: the background write of checkpoint step 4 failed (OSError: rank 0: OSError: [Errno 28] No space "
        f"left on device (injected by the test hook)); {partial} is incomplete and never resumed from"
    )
    assert [p.name for p in checkpoint.list_checkpoints(partial.parent)] == ["step_00000002"] and partial.is_dir()
    monkeypatch.delenv(FAIL_WRITE_AT_STEP)
    assert main(["train", CONFIG, *overrides]) == 0
    assert f"resumed from {partial.parent / 'step_00000002'} at step 2" in capsys.readouterr().out
    assert main(["train", CONFIG, *_overrides(tmp_path, "straight")]) == 0
    runs = tmp_path / "runs"
    _assert_same(
        _everything(checkpoint.step_dir(runs / "failing" / "checkpoints", 6)),
        _everything(checkpoint.step_dir(runs / "straight" / "checkpoints", 6)),
        "step 6",
    )


@pytest.mark.unit
def test_staging_that_does_not_fit_in_host_memory_saves_synchronously(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(HOST_MEMORY_GB, "0.000001")  # 1 KiB: less than the 3 KiB of model and momentum
    assert main(["train", CONFIG, *_overrides(tmp_path, "small", **{"checkpoint.async_save": True})]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "checkpoint.async_save" in line]
    assert len(lines) == 1, out
    assert "does not fit in 80% of the 0.00 GiB of available host memory; saving synchronously" in lines[0]
    for step in (2, 4, 6):
        checkpoint.verify(checkpoint.step_dir(tmp_path / "runs" / "small" / "checkpoints", step))


@pytest.mark.system
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_two_ranks_save_asynchronously_as_they_save_synchronously(tmp_path, strategy):
    """2 gloo ranks under torchrun, FSDP: every rank stages its own shards, the background
    writes agree over their own gloo group, and the checkpoints equal the synchronous ones."""
    runs = {
        name: _values(**{"checkpoint.async_save": async_save, "parallel.strategy": strategy})
        for name, async_save in (("sync", False), ("async", True))
    }
    launch_runs(tmp_path, CONFIG, 2, runs)  # one launch, one run after the other
    runs = tmp_path / "runs"
    for step in (2, 4, 6):
        sync_dir, async_dir = (checkpoint.step_dir(runs / name / "checkpoints", step) for name in ("sync", "async"))
        checkpoint.verify(async_dir)
        _assert_same(_everything(async_dir), _everything(sync_dir), f"step {step}")


@pytest.mark.unit
def test_a_stop_signal_drains_the_save_in_flight_and_saves_synchronously(tmp_path, capsys):
    """SIGUSR1 in step 5's forward: step 4's background save is finished and made visible, step
    5 is saved synchronously, exit 75; the same command continues and ends as an uninterrupted run."""
    signalling = {"model.name": "tests.user_models:signal_at_call", "model.kwargs": "{call: 5, signal_name: SIGUSR1}"}
    overrides = _overrides(tmp_path, "stopped", **{"checkpoint.async_save": True, **signalling})
    assert main(["train", CONFIG, *overrides]) == 75
    root = tmp_path / "runs" / "stopped" / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step_00000002", "step_00000004", "step_00000005"]
    assert not list(root.glob("*.partial"))
    for step in (2, 4, 5):
        checkpoint.verify(checkpoint.step_dir(root, step))
    assert main(["train", CONFIG, *overrides]) == 0  # step 6 and the evaluation: 3 forwards, no signal
    assert main(["train", CONFIG, *_overrides(tmp_path, "straight")]) == 0
    _assert_same(
        _everything(checkpoint.step_dir(root, 6)),
        _everything(checkpoint.step_dir(tmp_path / "runs" / "straight" / "checkpoints", 6)),
        "step 6",
    )
