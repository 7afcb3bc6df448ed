"""FSDP2 through real torchrun (2 gloo processes on CPU): same numbers as DDP, accumulation,
exact resume."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO,
    cli_env,
    final_model,
    gpt_runs,
    launch_gpt,
    logged,
    metrics_records,
    run_cli,
    run_logged,
    tiny_overrides,
)

from dist_train import checkpoint, cli

pytestmark = pytest.mark.system

GPT = {
    "data.dataset": "text",
    "data.seq_len": 32,
    "data.batch_size": 4,
    "model.name": "gpt",
    "model.n_layer": 2,
    "model.width": 32,
    "model.n_head": 2,
    "optim.name": "adamw",
    "optim.lr": 0.003,
    "schedule.warmup_steps": 2,
    "train.max_steps": 4,
    "train.log_every": 1,
    "train.eval_batches": 2,
    "checkpoint.every_steps": 0,
}


def _launch(root, name, nproc=2, **overrides):
    return launch_gpt(root, name, GPT, nproc, **overrides)


_params = final_model
FSDP = {"parallel.strategy": "fsdp"}
ACCUM = {"parallel.strategy": "fsdp", "data.batch_size": 2, "train.grad_accum_steps": 2}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The runs these tests compare, all on 2 ranks, trained one after another in one torchrun
    launch (each start costs seconds); a run that resumes one of them gets a launch of its own."""
    root = tmp_path_factory.mktemp("fsdp")
    # The memory-saving options change where work happens, not the numbers.
    options = {
        "parallel.activation_checkpointing": True,
        "parallel.sync_every_micro_batch": True,
        "parallel.cpu_offload": True,
    }
    if shutil.which("cc"):  # torch.compile's CPU backend needs a C compiler
        options["train.compile"] = True
    runs = {
        "ddp": {"parallel.strategy": "ddp"},
        "fsdp": FSDP,  # 2 ranks x batch 4, uninterrupted: the reference of the resumes below
        "fsdp_accum": ACCUM,
        "fsdp_options": {**ACCUM, **options},
        "bf16": {**FSDP, "train.precision": "bf16"},
        "to_export": {**FSDP, "train.max_steps": 2},
        "split": {**FSDP, "train.stop_at_step": 2},  # resumed on 2 ranks
        "elastic_2to1": {**FSDP, "train.stop_at_step": 2},  # resumed on 1
    }
    return root, gpt_runs(root, GPT, 2, runs)


def test_fsdp_matches_ddp_and_accumulation_matches_a_big_batch(two_ranks):
    root, _ = two_ranks
    runs = ("ddp", "fsdp", "fsdp_accum", "fsdp_options")
    ddp, fsdp, accumulated, with_options = (_params(root, n) for n in runs)
    assert ddp.keys() == fsdp.keys() == with_options.keys() and "blocks.0.attn.qkv.weight" in fsdp
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(accumulated[key], fsdp[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(with_options[key], fsdp[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(run_logged(root, "fsdp", "loss").values(), run_logged(root, "ddp", "loss").values(), strict=True):
        assert abs(a - b) < 1e-4
    # Clipping (gpt_cpu.yaml clips at 1.0) sees the global norm of the sharded gradients.
    for a, b in zip(
        run_logged(root, "fsdp", "grad_norm").values(), run_logged(root, "ddp", "grad_norm").values(), strict=True
    ):
        assert abs(a - b) < 1e-4 * b


def test_fsdp_resume_is_bitwise_exact(two_ranks):
    root, _ = two_ranks
    proc = _launch(root, "split", **FSDP)  # a fresh launch resumes the run stopped at step 2
    assert "at step 2" in proc.stdout
    straight, resumed = _params(root, "fsdp"), _params(root, "split")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    optim = checkpoint.read_full_state(checkpoint.latest_valid(root / "runs" / "split" / "checkpoints"), "optim")
    assert "state.blocks.0.attn.qkv.weight.exp_avg" in optim  # keyed by parameter name, gathered whole


def test_fsdp_bf16_trains(two_ranks):
    root, _ = two_ranks
    params = _params(root, "bf16")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in params.values())
    assert all(loss < 6.0 for loss in run_logged(root, "bf16", "loss").values())


def test_export_from_an_fsdp_checkpoint_reproduces_the_logits(two_ranks, tmp_path, capsys):
    from safetensors.torch import load_file

    from dist_train.gpt import GPT

    root, _ = two_ranks
    run_dir = root / "runs" / "to_export"
    out = tmp_path / "model.safetensors"
    proc = run_cli("export", str(run_dir), "--out", str(out), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    plain = GPT(vocab_size=256, context=32, n_layer=2, n_head=2, width=32)
    plain.load_state_dict(load_file(str(out)))
    reference = GPT(vocab_size=256, context=32, n_layer=2, n_head=2, width=32)
    reference.load_state_dict(_params(root, "to_export"))
    tokens = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(plain(tokens), reference(tokens), rtol=0, atol=0)

    # The same verb in this process (the one above was the real CLI): bf16, and a missing step.
    bf16 = tmp_path / "model_bf16.safetensors"
    assert cli.main(["export", str(run_dir), "--out", str(bf16), "--dtype", "bf16"]) == 0
    assert load_file(str(bf16))["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), "--out", str(bf16), "--step", "99"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {run_dir} has no checkpoint for step 99"


def _reload(tmp_path, source, nproc):
    """The state a fresh FSDP model and optimizer on `nproc` ranks hold after loading `source`."""
    out = tmp_path / f"reloaded_{nproc}.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    proc = subprocess.run(
        [*command, "tests/reload_worker.py", str(source), str(out)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_a_checkpoint_reshards_onto_another_world_size(two_ranks, tmp_path, saved_on, resumed_on):
    root, _ = two_ranks
    name = f"elastic_{saved_on}to{resumed_on}"
    if saved_on == 1:  # the same global batch of 8 on one rank takes 2 micro-batches; on resume it adapts
        _launch(root, name, nproc=1, **FSDP, **{"train.grad_accum_steps": 2, "train.stop_at_step": 2})
    saved = checkpoint.latest_valid(root / "runs" / name / "checkpoints")

    reloaded = _reload(tmp_path, saved, resumed_on)
    for prefix in ("model", "optim"):
        written = checkpoint.read_full_state(saved, prefix)
        assert written.keys() == reloaded[prefix].keys()
        for key, tensor in written.items():
            assert torch.equal(reloaded[prefix][key], tensor), f"{prefix} {key}"

    proc = _launch(root, name, nproc=resumed_on, **FSDP)
    assert f"written by {saved_on} processes, resumed on {resumed_on}" in proc.stdout
    # Steps 1-2 ran on one world size, 3-4 on the other: FSDP on 2 ranks holds about half the
    # parameter and optimizer bytes per rank (rank 0's local shards, as logged).
    state_mb = logged(root / "runs" / name, "param_optim_mb")
    one_rank, two_ranks_mb = (state_mb[2], state_mb[4]) if saved_on == 1 else (state_mb[4], state_mb[2])
    assert two_ranks_mb <= 0.55 * one_rank
    straight, resumed = _params(root, "fsdp"), _params(root, name)
    for key in straight:  # the same samples per step, only summed in another order
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-5)


def test_the_gpt_fsdp_config_learns_below_the_unigram_baseline(tmp_path):
    # The shipped config on its default corpus (the standard library), shortened to 150 steps.
    values = {"train.max_steps": 150, "train.log_every": 50, "checkpoint.every_steps": 0, "data.batch_size": 8}
    overrides = tiny_overrides(tmp_path, **values)
    proc = run_cli("launch", "configs/gpt_fsdp.yaml", "--nproc-per-node", "2", *overrides, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    baseline = float(proc.stdout.split("baseline: val_loss=")[1].split()[0])
    final = [r for r in metrics_records(tmp_path / "runs" / "gpt_fsdp") if "val_loss" in r][-1]
    assert final["step"] == 150 and final["val_loss"] < 0.8 * baseline, (final, baseline)
