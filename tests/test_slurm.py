"""SLURM: what `launch` reads from an allocation (unit), and slurm/train.sbatch on a real
one-node cluster started by slurm/local_cluster.sh: a job completes with its workers on all the
CPUs it was given; a job warned with SIGUSR1 checkpoints, requeues itself, resumes and ends
with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, cli_env, final_model

from dist_train.errors import UserError
from dist_train.launcher import LaunchOptions, from_slurm, torchrun_command
from dist_train.slurm import detect, expand_hostlist


@pytest.mark.unit
@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("vm", ["vm"]),
        ("gpu[01-03,07],cpu-a5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu-a5"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("a[1,3],b[001-002]", ["a1", "a3", "b001", "b002"]),
    ],
)
def test_hostlists_expand_like_scontrol_show_hostnames(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def _step_env(**extra):
    env = {"SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": "1"}
    return {**env, "SLURM_STEP_ID": "0", **extra}


@pytest.mark.unit
def test_an_srun_step_on_two_nodes_sets_the_launch_flags():
    step = detect(_step_env())
    assert (step.nnodes, step.node_rank, step.first_host) == (2, 1, "gpu07")
    opts = from_slurm(LaunchOptions(nproc_per_node="2"), set(), _step_env())
    assert (opts.nnodes, opts.node_rank, opts.rdzv_id) == (2, 1, "slurm-4711")
    assert opts.rdzv_endpoint == f"gpu07:{12000 + 4711}"
    cmd = torchrun_command("configs/digits.yaml", [], opts)
    assert "--rdzv-endpoint=gpu07:16711" in cmd and "--node-rank=1" in cmd and "--nnodes=2" in cmd
    # Another job on the same first node gets another port; flags the user gave win.
    assert detect(_step_env(SLURM_JOB_ID="4712")).rdzv_port != step.rdzv_port
    kept = from_slurm(LaunchOptions(nnodes=2, rdzv_id="mine"), {"nnodes", "rdzv_id"}, _step_env())
    assert kept.rdzv_id == "mine" and kept.node_rank == 1


@pytest.mark.unit
def test_rendezvous_ports_stay_out_of_the_ephemeral_and_privileged_ranges():
    # Linux hands ports from 32768-60999 to outgoing connections; ports below 1024 need root.
    ports = {detect(_step_env(SLURM_JOB_ID=str(job))).rdzv_port for job in [*range(0, 50000, 7), 999999, 2**31 - 1]}
    assert min(ports) > 1024 and max(ports) < 32768
    assert len(ports) > 5000  # still spread by job id
    assert detect(_step_env(SLURM_JOB_ID="123_4")).rdzv_port < 32768  # array jobs: digits only


@pytest.mark.unit
def test_one_node_or_no_slurm_changes_nothing():
    assert from_slurm(LaunchOptions(), set(), {}) == LaunchOptions()
    one_node = _step_env(SLURM_NNODES="1", SLURM_JOB_NODELIST="vm", SLURM_NODEID="0")
    assert from_slurm(LaunchOptions(), set(), one_node) == LaunchOptions()  # private standalone rendezvous


@pytest.mark.unit
def test_launching_from_the_batch_script_of_a_multi_node_job_is_refused():
    batch_host = {k: v for k, v in _step_env().items() if k != "SLURM_STEP_ID"}
    with pytest.raises(UserError, match="srun --ntasks-per-node=1"):
        detect(batch_host)
    with pytest.raises(UserError, match="2 tasks per node"):
        detect(_step_env(SLURM_NTASKS_PER_NODE="2"))


# --------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster():
    missing = [tool for tool in ("sbatch", "slurmctld", "slurmd", "munged") if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
            "slurm-client munge (.ci/run does)"
        )
    if os.geteuid() != 0:
        pytest.skip("starting a local SLURM cluster needs root")
    proc = subprocess.run(["bash", "slurm/local_cluster.sh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return True


def _submit(tmp_path, name, *overrides):
    env = {**cli_env(), "PYTHON": sys.executable, "NPROC_PER_NODE": "2", "MAX_REQUEUES": "3"}
    command = [
        "sbatch", "--parsable", "--partition=debug", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",
        f"--output={tmp_path}/slurm-{name}-%j.out", "slurm/train.sbatch", "configs/digits.yaml",
        f"run.output_dir={tmp_path}/runs", f"run.name={name}", "parallel.strategy=ddp", "logging.wandb.mode=offline",
        "train.progress_bar=false", "train.max_epochs=null", "data.batch_size=16", *overrides,
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(job_id):
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", shown))


def _wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _release(job_id):
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)


def _finished(job_id):
    job = _job(job_id)
    return job if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None


STEPS = ["train.max_steps=1500", "train.log_every=10", "checkpoint.every_steps=1000"]


@pytest.mark.system
def test_a_job_completes_and_a_warned_job_requeues_and_resumes_exactly(cluster, tmp_path):
    straight = _submit(tmp_path, "straight", *STEPS)
    job = _wait_until(lambda: _finished(straight), 240, f"job {straight}")
    output = (tmp_path / f"slurm-straight-{straight}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", output[-3000:]
    # The job got 2 CPUs (--cpus-per-task=2) and the local cluster binds srun tasks to the
    # cores their step asked for: the workers must see both, not the one srun asks for alone.
    assert "launch: 2 CPUs available to this node's 2 worker(s)" in output, output[-3000:]
    assert "warning: only" not in output

    preempted = _submit(tmp_path, "preempted", *STEPS)
    metrics = tmp_path / "runs" / "preempted" / "metrics.jsonl"
    _wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 5, 120, "training to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", preempted], check=True)
    # SLURM holds a requeued job for about two minutes before it may start again; release it
    # now rather than wait (the requeue itself is the script's own `scontrol requeue`).
    log = tmp_path / f"slurm-preempted-{preempted}.out"

    pending_since = []

    def restarted() -> bool:
        # Release only once the old run has been cleaned up for a few seconds: a release right
        # after the requeue starts it while its credential is still revoked, which fails it.
        if _job(preempted).get("JobState") == "PENDING":
            if not pending_since:
                pending_since.append(time.monotonic())
            if time.monotonic() - pending_since[0] > 5:
                _release(preempted)
        return f"job {preempted} (restart 1)" in log.read_text()

    _wait_until(restarted, 240, "the requeued job to start")
    job = _wait_until(lambda: _finished(preempted), 300, f"job {preempted}")
    output = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output[-3000:]

    stopped = re.search(r"stopped at step (\d+) on SIGUSR1", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert 0 < step < 1500
    assert f"requeueing job {preempted}" in output
    assert re.search(rf"resumed from \S+step_{step:08d} at step {step}", output), output[-3000:]
    assert f"job {preempted} (restart 1)" in output

    straight_params, resumed_params = final_model(tmp_path, "straight"), final_model(tmp_path, "preempted")
    assert straight_params.keys() == resumed_params.keys()
    for key in straight_params:
        assert torch.equal(straight_params[key], resumed_params[key]), key
    # One W&B run across the requeue: the resumed job continued the saved run id.
    runs = list((tmp_path / "runs" / "preempted" / "wandb").glob("offline-run-*"))
    assert len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    logged = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 1500
