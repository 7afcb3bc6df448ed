"""The documented entry points in launch/: two node agents rendezvous on this machine."""

from __future__ import annotations

import subprocess

import pytest
from conftest import REPO, cli_env, tiny_overrides, two_node_agents

from dist_train import checkpoint

pytestmark = pytest.mark.system


def test_two_node_agents_train_one_job(tmp_path):
    outputs = two_node_agents(tiny_overrides(tmp_path, **{"parallel.strategy": "ddp", "train.max_steps": 4}), 1)
    assert "--nnodes=2" in outputs[0] and "--node-rank=1" in outputs[1]
    # c10d rendezvous decides which node hosts global rank 0, so look at both outputs.
    assert "training 4 steps of global batch 32 (2 x 16 x 1" in "".join(outputs)
    saved = checkpoint.latest_valid(tmp_path / "runs" / "digits" / "checkpoints")
    assert saved.name == "step_00000004"
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in saved.iterdir()}


def test_scripts_explain_their_usage():
    proc = subprocess.run(
        ["bash", "launch/multi_node.sh", "configs/digits.yaml"], cwd=REPO, env=cli_env(), capture_output=True, text=True
    )
    assert proc.returncode != 0 and "NNODES" in proc.stderr
    proc = subprocess.run(["bash", "launch/single_node.sh"], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
