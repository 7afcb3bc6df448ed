"""Atomic, verified checkpoints: what resume picks, skips and refuses."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train import checkpoint
from dist_train.checkpoint import CheckpointError
from dist_train.data import Batch
from dist_train.distributed import DistEnv
from dist_train.train.plan import check_compatible

pytestmark = pytest.mark.unit

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _state(step: int) -> dict:
    return {"step": step, "data": {"epoch": 0, "samples_consumed": step}}


def _model_and_optimizer(out_features: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, out_features)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(root, step, keep_last=10, state=None):
    model, optimizer = _model_and_optimizer()
    return checkpoint.save(root, step, state or _state(step), model, optimizer, ENV, keep_last)


def test_save_writes_manifest_and_loads_weights_only(tmp_path):
    path = _save(tmp_path, 7)
    assert path.name == "step_00000007"
    manifest = json.loads((path / "manifest.json").read_text())
    files = set(manifest["files"])
    assert manifest["step"] == 7 and {"train_state.pt", "rng_rank0.pt", "model_optim/.metadata"} <= files
    assert any(name.startswith("model_optim/") and name.endswith(".distcp") for name in files)
    checkpoint.verify(path)
    state = checkpoint.load_train_state(path)
    assert state["step"] == 7 and state["data"]["samples_consumed"] == 7


def test_model_and_optimizer_round_trip_through_dcp(tmp_path):
    path = _save(tmp_path, 1)
    saved_model, saved_optimizer = _model_and_optimizer()
    model, optimizer = _model_and_optimizer(seed=5)
    checkpoint.load_model_and_optimizer(path, model, optimizer)
    for a, b in zip(model.parameters(), saved_model.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["momentum_buffer"], saved_optimizer.state[b]["momentum_buffer"])
    full = checkpoint.read_full_state(path, "model")
    assert set(full) == {"weight", "bias"} and torch.equal(full["weight"], saved_model.weight)


def test_a_corrupted_shard_file_is_detected(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    shard = next((newest / "model_optim").glob("*.distcp"))
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    assert checkpoint.latest_valid(tmp_path).name == "step_00000001"


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_partial_directory_is_never_picked(tmp_path):
    _save(tmp_path, 1)
    partial = tmp_path / "step_00000002.partial"
    partial.mkdir()
    (partial / "train_state.pt").write_bytes(b"half")
    assert checkpoint.latest_valid(tmp_path).name == "step_00000001"


def test_corrupted_checkpoint_is_skipped_for_the_previous_one(tmp_path, capsys):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    blob = bytearray((newest / "train_state.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (newest / "train_state.pt").write_bytes(bytes(blob))
    assert checkpoint.latest_valid(tmp_path).name == "step_00000001"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_00000002" in err[0] and "corrupted" in err[0]


def test_truncated_and_manifestless_checkpoints_are_skipped(tmp_path):
    _save(tmp_path, 1)
    truncated = _save(tmp_path, 2)
    data = (truncated / "train_state.pt").read_bytes()
    (truncated / "train_state.pt").write_bytes(data[: len(data) // 3])
    no_manifest = _save(tmp_path, 3)
    (no_manifest / "manifest.json").unlink()
    assert checkpoint.latest_valid(tmp_path).name == "step_00000001"


def test_newer_format_version_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = checkpoint.FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version"):
        checkpoint.resolve_resume(str(path), tmp_path)


def test_resume_modes(tmp_path):
    assert checkpoint.resolve_resume("auto", tmp_path / "none_yet") is None
    assert checkpoint.resolve_resume("never", tmp_path / "none_yet") is None
    _save(tmp_path, 5)
    assert checkpoint.resolve_resume("auto", tmp_path).name == "step_00000005"
    with pytest.raises(CheckpointError, match="resume=never"):
        checkpoint.resolve_resume("never", tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_resaving_an_existing_step_replaces_it_whole(tmp_path):
    _save(tmp_path, 3)
    state = _state(3)
    state["marker"] = 42
    path = _save(tmp_path, 3, keep_last=5, state=state)
    assert checkpoint.load_train_state(path)["marker"] == 42
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


def test_model_mismatch_names_the_parameter_and_shapes(tmp_path):
    path = _save(tmp_path, 1)
    wider, optimizer = _model_and_optimizer(out_features=4)
    with pytest.raises(CheckpointError, match=r"weight has shape \(2, 3\) in the checkpoint, \(4, 3\) in the model"):
        checkpoint.load_model_and_optimizer(path, wider, optimizer)
    extra = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="0.weight is missing"):
        checkpoint.load_model_and_optimizer(path, extra, torch.optim.SGD(extra.parameters(), lr=0.1))


def test_rng_state_round_trips_every_generator(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = _save(tmp_path, 1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load_rng_state(path, rank=0))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    with pytest.raises(CheckpointError, match="no RNG state for rank 1"):
        checkpoint.load_rng_state(path, rank=1)


def test_set_aside_newer_keeps_them_on_disk(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    (tmp_path / "step_00000006.abandoned").mkdir()  # from an earlier rewind
    moved = checkpoint.set_aside_newer(tmp_path, 2)
    assert sorted(p.name for p in moved) == ["step_00000004.abandoned", "step_00000006.abandoned.1"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002"]
    assert checkpoint.latest_valid(tmp_path).name == "step_00000002"
    checkpoint.verify(tmp_path / "step_00000004.abandoned")  # still intact, only renamed


def test_a_stale_directory_from_a_crash_does_not_block_a_save(tmp_path):
    _save(tmp_path, 3)
    (tmp_path / "step_00000003.stale").mkdir()
    (tmp_path / "step_00000003.stale" / "junk").write_text("x")
    path = _save(tmp_path, 3)
    checkpoint.verify(path)
    assert not (tmp_path / "step_00000003.stale").exists()


@pytest.mark.parametrize(
    "change, world, message",
    [
        ({}, 3, "3 processes x data.batch_size 16 cannot make it up by accumulation"),
        ({"data.batch_size": 32}, 2, "data.batch_size=16, this run has 32, which changes the global batch of 16"),
        ({"optim.name": "adam"}, 1, "optim.name=sgd, this run has adam"),
        ({"data.batch_size": 8}, 1, "data.batch_size=16, this run has 8"),
        ({"train.grad_accum_steps": 2}, 1, "train.grad_accum_steps=1, this run has 2"),
        ({"model.name": "mlp"}, 1, "model.name=seed_cnn, this run has mlp"),
        ({"train.precision": "fp16"}, 1, "train.precision=fp32, this run has fp16"),
    ],
)
def test_resume_refuses_a_run_that_cannot_continue(change, world, message):
    from dist_train.config import load_config, to_dict

    base = ["data.batch_size=16", "train.max_steps=10"]
    saved = {"world_size": 1, "global_batch": 16, "config": to_dict(load_config("configs/digits.yaml", base))}
    current = load_config("configs/digits.yaml", base + [f"{k}={v}" for k, v in change.items()])
    with pytest.raises(CheckpointError, match=message):
        check_compatible(saved, current, _batch(current, world), Path("ckpt"))


def _batch(cfg, world: int) -> Batch:
    """The step's batch the plan gives `cfg` on `world` processes, before any resume."""
    return Batch(world, cfg.data.batch_size, cfg.train.grad_accum_steps)


def test_a_new_world_size_keeps_the_global_batch_through_accumulation():
    from dist_train.config import load_config, to_dict

    base = ["data.batch_size=16", "train.max_steps=10", "train.grad_accum_steps=2"]
    user_config = to_dict(load_config("configs/digits.yaml", base))
    saved = {"world_size": 2, "global_batch": 64, "config": user_config}
    current = load_config("configs/digits.yaml", base)
    assert check_compatible(saved, current, _batch(current, 1), Path("c")) == Batch(1, 16, 4)
    assert check_compatible(saved, current, _batch(current, 4), Path("c")) == Batch(4, 16, 1)
    # Saved by that 1-rank resume (adapted to 4 micro-batches), resumed again with the same command.
    again = {"world_size": 1, "global_batch": 64, "config": user_config}
    assert check_compatible(again, current, _batch(current, 1), Path("c")) == Batch(1, 16, 4)
    # A larger per-rank batch that keeps the global batch is fine without adaptation.
    doubled = load_config("configs/digits.yaml", ["data.batch_size=32", "train.max_steps=10"])
    assert check_compatible(saved, doubled, _batch(doubled, 2), Path("c")) == Batch(2, 32, 1)
    with pytest.raises(CheckpointError, match="changes the global batch of 64"):
        check_compatible(saved, doubled, _batch(doubled, 1), Path("c"))
    strategy_change = load_config("configs/digits.yaml", base + ["parallel.strategy=fsdp"])
    assert check_compatible(saved, strategy_change, _batch(strategy_change, 2), Path("c")) == Batch(2, 16, 2)
    assert strategy_change.train.grad_accum_steps == 2  # the config itself is never rewritten
