"""HSDP (parallel.replicate_degree) through real torchrun, 4 gloo processes on CPU: the same
numbers as DDP and plain FSDP, resume across meshes and world sizes, and the one-line refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, final_model, gpt_runs, launch_gpt, run_cli, run_logged, tiny_overrides, two_node_agents

from dist_train import checkpoint
from dist_train.config import ConfigError, ParallelConfig
from dist_train.parallel import mesh_shape

GPT = {
    "data.dataset": "text",
    "data.seq_len": 32,
    "data.batch_size": 4,  # x 4 processes: a global batch of 16
    "model.name": "gpt",
    "model.n_layer": 2,
    "model.width": 32,
    "model.n_head": 2,
    "optim.name": "adamw",
    "optim.lr": 0.003,
    "schedule.warmup_steps": 2,
    "train.max_steps": 10,
    "train.log_every": 1,
    "train.eval_batches": 2,
    "checkpoint.every_steps": 0,
}
HSDP = {"parallel.strategy": "fsdp", "parallel.replicate_degree": 2}


def _launch(root, name, nproc=4, **overrides):
    return launch_gpt(root, name, GPT, nproc, **overrides)


_params = final_model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """10 steps of the same global batch of 16 on 4 processes: HSDP 2x2, DDP and plain FSDP
    (replicate_degree auto: one node, so one replica), each keeping an EMA of its weights (which
    changes no training number). Shared: each torchrun start costs seconds."""
    root = tmp_path_factory.mktemp("hsdp")
    ema = {"train.ema.decay": 0.5, "train.ema.warmup": False}
    runs = {
        "hsdp": {**HSDP, **ema},
        "ddp": {"parallel.strategy": "ddp", **ema},
        "fsdp": {"parallel.strategy": "fsdp", "parallel.replicate_degree": "auto", **ema},
    }
    stdout = gpt_runs(root, GPT, 4, runs)  # one launch trains the three, one after another
    return root, stdout


@pytest.mark.system
def test_hsdp_matches_ddp_and_fsdp_step_by_step(uninterrupted):
    root, stdout = uninterrupted
    assert "mesh: dp_replicate=2 x dp_shard=2 (HSDP)" in stdout["hsdp"]
    assert "mesh: dp_shard=4 (FSDP)" in stdout["fsdp"] and "mesh:" not in stdout["ddp"]
    hsdp = run_logged(root, "hsdp", "loss")
    assert sorted(hsdp) == list(range(1, 11))
    for other in ("ddp", "fsdp"):
        assert run_logged(root, other, "loss").keys() == hsdp.keys()
        for step, loss in run_logged(root, other, "loss").items():
            assert abs(hsdp[step] - loss) < 1e-4, (other, step)
        # gpt_cpu.yaml clips at 1.0: the norm of gradients sharded over a 2-D mesh is the global one.
        for step, norm in run_logged(root, other, "grad_norm").items():
            assert abs(run_logged(root, "hsdp", "grad_norm")[step] - norm) < 1e-4 * norm, (other, step)
    final = {name: _params(root, name) for name in ("hsdp", "ddp", "fsdp")}
    assert final["hsdp"].keys() == final["ddp"].keys() and "blocks.0.attn.qkv.weight" in final["hsdp"]
    for key, tensor in final["hsdp"].items():
        torch.testing.assert_close(tensor, final["ddp"][key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tensor, final["fsdp"][key], rtol=1e-4, atol=1e-5)
    # train.ema under HSDP: each rank averages the shard it holds; gathered whole, the average
    # is DDP's and FSDP's (and not the weights themselves).
    averages = {
        name: checkpoint.read_full_state(checkpoint.latest_valid(root / "runs" / name / "checkpoints"), "ema")
        for name in ("hsdp", "ddp", "fsdp")
    }
    assert averages["hsdp"].keys() == averages["ddp"].keys() and "blocks.0.attn.qkv.weight" in averages["hsdp"]
    for key, tensor in averages["hsdp"].items():
        torch.testing.assert_close(tensor, averages["ddp"][key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tensor, averages["fsdp"][key], rtol=1e-4, atol=1e-5)
    assert max((final["hsdp"][k] - averages["hsdp"][k]).abs().max() for k in averages["hsdp"]) > 1e-4
    # Sharded within a replica of 2 processes: about half of DDP's bytes per rank, twice FSDP's.
    state_mb = {name: run_logged(root, name, "param_optim_mb")[10] for name in ("hsdp", "ddp", "fsdp")}
    assert 0.4 * state_mb["ddp"] < state_mb["hsdp"] < 0.6 * state_mb["ddp"], state_mb
    assert 1.6 * state_mb["fsdp"] < state_mb["hsdp"] < 2.4 * state_mb["fsdp"], state_mb


@pytest.mark.system
def test_resume_across_meshes_and_world_sizes_continues_the_run(uninterrupted):
    # 4 -> 2 -> 2 -> 4 processes, each segment 2 steps of the same global batch of 16, each
    # resuming the previous one's checkpoint: HSDP 2x2, FSDP on 2 (accumulating 2 micro-batches),
    # DDP on 2 (4 micro-batches), then HSDP 2x2 with every memory option and per-micro-batch
    # reduce-scatter (torch.compile, half a minute here, is checked against eager in
    # test_parallel.py and under FSDP with these options in test_fsdp.py). Together: one
    # uninterrupted run. (A new world size keeps
    # the micro-batch: accumulation adapts.) Each segment costs ~30 s of CI, so a 4x1 mesh
    # (pure replication) is not in the chain.
    root, _ = uninterrupted
    accum = {"data.batch_size": 2, "train.grad_accum_steps": 2}
    options = {
        "parallel.activation_checkpointing": True,
        "parallel.cpu_offload": True,
        "parallel.sync_every_micro_batch": True,
    }
    segments = [
        (4, HSDP),
        (2, {"parallel.strategy": "fsdp"}),
        (2, {"parallel.strategy": "ddp", "data.batch_size": 2, "train.grad_accum_steps": 4}),  # 2 x 2 x 4 = 16
        (4, {**HSDP, **accum, **options}),
    ]
    stdout = []
    for index, (nproc, overrides) in enumerate(segments):
        stop = {"train.stop_at_step": 2 * index + 2} if index < len(segments) - 1 else {}
        stdout.append(_launch(root, "elastic", nproc=nproc, **overrides, **stop).stdout)
        if index:
            assert f"at step {2 * index}" in stdout[-1]
    assert "mesh: dp_replicate=2 x dp_shard=2 (HSDP)" in stdout[0] and "mesh: dp_shard=2 (FSDP)" in stdout[1]
    straight, elastic = run_logged(root, "hsdp", "loss"), run_logged(root, "elastic", "loss")
    assert elastic.keys() == straight.keys()
    for step, loss in elastic.items():  # the same samples per step, only summed in another order
        assert abs(loss - straight[step]) < 1e-4, step
    resumed, reference = _params(root, "elastic"), _params(root, "hsdp")
    for key, tensor in reference.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-4, atol=1e-5)
    saved = checkpoint.latest_valid(root / "runs" / "elastic" / "checkpoints")
    optim = checkpoint.read_full_state(saved, "optim")
    assert "state.blocks.0.attn.qkv.weight.exp_avg" in optim  # keyed by parameter name, gathered whole


@pytest.mark.system
@pytest.mark.parametrize(
    "nproc, overrides, message",
    [
        (4, {**HSDP, "parallel.replicate_degree": 3}, "parallel.replicate_degree=3 does not divide the world size"),
        (2, {"parallel.strategy": "ddp", "parallel.replicate_degree": 2}, "parallel.replicate_degree applies only"),
        (2, {"parallel.strategy": "fsdp", "parallel.replicate_degree": 0}, "parallel.replicate_degree must be >= 1"),
        (2, {"parallel.strategy": "fsdp", "parallel.replicate_degree": "two"}, "parallel.replicate_degree must be"),
    ],
)
def test_bad_replicate_degrees_are_refused_in_one_line(tmp_path, nproc, overrides, message):
    overrides = tiny_overrides(tmp_path, **overrides)
    proc = run_cli("launch", "configs/digits.yaml", "--nproc-per-node", str(nproc), *overrides, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # refused before any worker started


@pytest.mark.unit
def test_mesh_shape_per_node_and_refusals():
    fsdp = ParallelConfig(strategy="fsdp", replicate_degree="auto")
    assert mesh_shape(fsdp, 16, 8) == {"dp_replicate": 2, "dp_shard": 8}  # one replica per node
    assert mesh_shape(fsdp, 4) == {"dp_replicate": 1, "dp_shard": 4}  # one node
    assert mesh_shape(ParallelConfig(strategy="fsdp", replicate_degree=4), 8) == {"dp_replicate": 4, "dp_shard": 2}
    with pytest.raises(ConfigError, match="replicate_degree=auto needs the same number of processes"):
        mesh_shape(fsdp, 12, 8)


@pytest.mark.system
def test_auto_is_one_replica_per_node_of_two_node_agents(tmp_path):
    # Two torchrun agents of 2 processes each rendezvous on this machine, as two nodes would.
    values = {"parallel.strategy": "fsdp", "parallel.replicate_degree": "auto", "train.max_steps": 2}
    outputs = two_node_agents(tiny_overrides(tmp_path, **values), 2)
    # c10d rendezvous decides which node hosts global rank 0, so look at both outputs.
    assert "mesh: dp_replicate=2 x dp_shard=2 (HSDP)" in "".join(outputs)
    assert checkpoint.latest_valid(tmp_path / "runs" / "digits" / "checkpoints").name == "step_00000002"
