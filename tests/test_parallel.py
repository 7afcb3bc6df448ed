"""2 ranks vs 1 through real torchrun (gloo, CPU): DDP with and without accumulation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import REPO, final_model, launch_runs, run_cli, tiny_overrides

import dist_train
from dist_train import checkpoint
from dist_train.config import DataConfig, ModelConfig, ParallelConfig, load_config
from dist_train.data import build_datasets
from dist_train.distributed import DistEnv
from dist_train.models import build_model
from dist_train.parallel import DDP, SingleProcess, build_strategy, prepare_blocks
from dist_train.process_settings import seed_everything

COMMON = {
    "train.max_steps": 5,
    "checkpoint.every_steps": 0,
    "optim.lr": 0.2,
    "schedule.name": "cosine",
    "parallel.strategy": "ddp",
    "data.augment": True,
}


def _launch(tmp_path, nproc, name, **overrides):
    proc = run_cli(
        "launch",
        "configs/digits.yaml",
        "--nproc-per-node",
        str(nproc),
        *tiny_overrides(tmp_path, **{"run.name": name, **COMMON, **overrides}),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.system
def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path):
    # One process in this one; the two 2-rank runs one after another in one launch.
    dist_train.fit(
        "configs/digits.yaml", tiny_overrides(tmp_path, **{"run.name": "one", **COMMON, "data.batch_size": 32})
    )
    two = {"two": {"data.batch_size": 16}, "two_accum": {"data.batch_size": 8, "train.grad_accum_steps": 2}}
    launch_runs(tmp_path, "configs/digits.yaml", 2, {name: {**COMMON, **values} for name, values in two.items()})
    one = final_model(tmp_path, "one")
    for name in ("two", "two_accum"):
        other = final_model(tmp_path, name)
        for key in one:
            torch.testing.assert_close(other[key], one[key], rtol=1e-5, atol=1e-6)
    # The comparison means something only if training moved the weights.
    seed_everything(0)
    fresh = build_model(ModelConfig(), build_datasets(DataConfig()).spec).state_dict()
    initial_drift = max((fresh[k] - one[k]).abs().max().item() for k in one)
    assert initial_drift > 1e-3
    saved = checkpoint.list_checkpoints(tmp_path / "runs" / "two" / "checkpoints")[-1]
    assert {p.name for p in saved.iterdir()} >= {"rng_rank0.pt", "rng_rank1.pt", "train_state.pt", "manifest.json"}


@pytest.mark.system
def test_strategy_none_refuses_several_processes(tmp_path):
    proc = run_cli(
        "launch",
        "configs/digits.yaml",
        "--nproc-per-node",
        "2",
        *tiny_overrides(tmp_path, **{"parallel.strategy": "none"}),
        cwd=REPO,
    )
    assert proc.returncode != 0
    assert "parallel.strategy=none cannot train with 2 processes" in proc.stderr


@pytest.mark.unit
def test_one_process_trains_ddp_as_none():
    env = DistEnv(0, 0, 1, torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    for strategy in ("none", "ddp"):
        single = build_strategy(ParallelConfig(strategy=strategy), env)
        assert type(single) is SingleProcess and single.wrap(model) is model and single.unwrap(model) is model
    assert isinstance(build_strategy(ParallelConfig(strategy="ddp"), DistEnv(0, 0, 2, torch.device("cpu"))), DDP)


@pytest.mark.system
def test_two_rank_resume_is_bitwise_exact(tmp_path):
    # Stop mid-epoch with accumulation on 2 ranks, resume, and compare with an uninterrupted run.
    run = {"data.batch_size": 8, "train.grad_accum_steps": 2, "train.max_steps": 6, "optim.momentum": 0.9}
    runs = {"straight": {**COMMON, **run}, "split": {**COMMON, **run, "train.stop_at_step": 3}}
    launch_runs(tmp_path, "configs/digits.yaml", 2, runs)  # one launch, one run after the other
    proc = _launch(tmp_path, 2, "split", **run)  # a fresh launch resumes
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    straight, resumed = final_model(tmp_path, "straight"), final_model(tmp_path, "split")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.unit
def test_fsdp_needs_a_process_group_and_no_fp16():
    import pytest

    from dist_train.config import ConfigError

    env = DistEnv(0, 0, 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match="needs a process group"):
        build_strategy(ParallelConfig(strategy="fsdp"), env)
    # Refused with the config, before any worker starts (launch loads it first).
    with pytest.raises(ConfigError, match="^train.precision fp16 is not supported with parallel.strategy=fsdp"):
        load_config(None, ["parallel.strategy=fsdp", "train.precision=fp16", "train.max_steps=1"])


def _tiny_gpt():
    from dist_train.gpt import GPT

    torch.manual_seed(0)
    return GPT(vocab_size=64, context=16, n_layer=2, n_head=2, width=32)


def _grads_and_saved_bytes(model, tokens):
    """Gradients after one backward, and the bytes autograd kept for it between forward and backward."""
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logits = model(tokens)
    logits.float().logsumexp(-1).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, sum(saved)


@pytest.mark.unit
def test_activation_checkpointing_keeps_gradients_and_saves_memory():
    tokens = torch.randint(0, 64, (4, 16))
    plain_grads, plain_bytes = _grads_and_saved_bytes(_tiny_gpt(), tokens)
    checkpointed = prepare_blocks(_tiny_gpt(), activation_checkpointing=True, compile=False)
    assert [n for n, _ in checkpointed.named_parameters()] == list(plain_grads)  # checkpoints still fit
    grads, kept_bytes = _grads_and_saved_bytes(checkpointed, tokens)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name
    assert kept_bytes < 0.5 * plain_bytes


@pytest.mark.system
@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's CPU backend needs a C compiler (cc)")
def test_compiled_blocks_match_eager():
    tokens = torch.randint(0, 64, (4, 16))
    eager_grads, _ = _grads_and_saved_bytes(_tiny_gpt(), tokens)
    compiled = prepare_blocks(_tiny_gpt(), activation_checkpointing=True, compile=True)
    grads, _ = _grads_and_saved_bytes(compiled, tokens)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5)


@pytest.mark.system
def test_an_epoch_split_over_2_then_1_then_2_ranks_sees_every_sample_once(tmp_path):
    # 256 synthetic samples, global batch 16 (2 x 8, or 1 x 8 x 2 accumulation): 16 steps per
    # epoch. Three invocations on 2, 1 and 2 processes stop at steps 5 and 11 and end at 16.
    record = tmp_path / "record"
    record.mkdir()
    common = {
        "data.dataset": "synthetic",
        "data.synthetic_size": 256,
        "data.batch_size": 8,
        "model.name": "tests.user_models:recording_linear",
        "model.kwargs": json.dumps({"record_dir": str(record)}),
        "train.max_steps": 16,
        "checkpoint.every_steps": 0,
    }
    for nproc, stop in ((2, 5), (1, 11), (2, None)):
        values = {**COMMON, **common, "train.stop_at_step": stop}
        overrides = tiny_overrides(tmp_path, **values)
        proc = run_cli("launch", "configs/digits.yaml", "--nproc-per-node", str(nproc), *overrides, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 1 processes, resumed on 2" in proc.stdout

    cfg = load_config("configs/digits.yaml", tiny_overrides(tmp_path, **common))
    index_of = {repr(x.flatten()[0].item()): i for i, (x, _) in enumerate(build_datasets(cfg.data).train)}
    seen = [index_of[line] for file in sorted(record.iterdir()) for line in file.read_text().split()]
    assert sorted(seen) == list(range(256))  # every sample of the epoch exactly once


@pytest.mark.system
def test_a_rank_that_stops_participating_fails_the_others_within_the_timeout(tmp_path):
    import time

    values = {
        **COMMON,
        "model.name": "tests.user_models:sleepy_rank",
        "model.kwargs": json.dumps({"seconds": 10}),
        "train.max_steps": 10,
        "parallel.collective_timeout_s": 3,
    }
    start = time.monotonic()
    proc = run_cli(
        "launch", "configs/digits.yaml", "--nproc-per-node", "2", *tiny_overrides(tmp_path, **values), cwd=REPO
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error (rank 0): a collective timed out after 3 s" in proc.stderr, proc.stderr[-3000:]
    assert "rank(s) 1 did not respond" in proc.stderr
    assert time.monotonic() - start < 60  # not hung: the timeout and torchrun's shutdown, no more


@pytest.fixture(scope="module")
def two_rank_findings(tmp_path_factory):
    """What tests/parallel_worker.py measured inside 2 gloo processes."""
    import subprocess
    import sys

    from conftest import cli_env

    out = tmp_path_factory.mktemp("parallel") / "findings.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*command, "tests/parallel_worker.py", str(out)], cwd=REPO, env=cli_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.multiprocess
def test_fsdp_keeps_the_root_gathered_and_gathers_once_per_micro_batch(two_rank_findings):
    found = two_rank_findings["fsdp_gathers"]
    # The root (embedding, head) stays gathered from forward to backward; blocks reshard.
    assert found["root_resharded"] is False and found["blocks_resharded"] == [True, True]
    # 2 blocks + root, 2 micro-batches a step: the first gathers root and blocks for forward
    # and the blocks again for backward; the second keeps what backward gathered for its
    # forward and gathers the blocks once more for its own backward (it was 6 and 6).
    assert found["per_micro_batch"] == [5, 2, 5, 2]


@pytest.mark.multiprocess
def test_fsdp_bf16_keeps_batchnorm_in_fp32_and_trains_like_autocast(two_rank_findings):
    found = two_rank_findings["fsdp_bf16_batchnorm"]
    assert found["fsdp_weight_dtypes"] == {"Conv2d": "torch.bfloat16", "FSDPBatchNorm2d": "torch.float32"}
    assert found["fsdp_losses"][-1] < 0.1 * found["fsdp_losses"][0]  # it trains
    torch.testing.assert_close(found["fsdp_losses"], found["autocast_losses"], rtol=1e-2, atol=1e-3)


@pytest.mark.multiprocess
def test_ddp_zeroes_bucket_gradients_in_place_and_averages_them_right(two_rank_findings):
    for rank in two_rank_findings["ddp"]:
        assert rank["is_ddp"] == "DistributedDataParallel"
        # Zeroed, not freed: backward accumulates straight into DDP's buckets.
        assert all(value == 0.0 for step in rank["grads_after_zero_grad"] for value in step)
        assert rank["max_gradient_error"] < 1e-6  # nothing left over from the step before


@pytest.mark.multiprocess
def test_find_batch_frees_its_trial_model_optimizer_and_wrapper(two_rank_findings):
    """Before the real model is built: FSDP's states hold its trial model in reference cycles,
    which lived on (until the next collection) before the search released them."""
    for strategy in ("ddp", "fsdp"):
        found = two_rank_findings["find_batch"][strategy]
        assert found["micro_batch"] == 18  # out of memory injected above 20, less ~10% headroom
        assert found["alive"] == [False, False, False], strategy  # wrapped model, module, optimizer
