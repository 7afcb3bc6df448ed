"""`dist-train launch`: the torchrun command it builds (in-process, no workers) and one real tiny launch."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli_env, final_model, run_cli, tiny_overrides
from torch.distributed.run import get_args_parser

from dist_train import checkpoint, launcher, worker_env
from dist_train.config import UserError, load_config
from dist_train.launcher import LaunchOptions, resolve_nproc, torchrun_command

CONFIG = "configs/digits.yaml"
OVERRIDES = ["optim.lr=0.05", "run.name=my run", "optim.betas=[0.9, 0.99]", "train.max_steps=7"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _torchrun_args(cmd: list[str]):
    """Parse a built command with the installed torchrun's own parser: every flag must be one it knows."""
    assert cmd[:3] == TORCHRUN
    return get_args_parser().parse_args(cmd[3:])


# --------------------------------------------------------------------------- resolve_nproc


@pytest.mark.unit
def test_auto_is_one_on_a_cpu_machine(no_gpu):
    assert resolve_nproc("auto") == 1


@pytest.mark.unit
def test_auto_on_this_machine():
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert resolve_nproc("auto") == max(gpus, 1)


@pytest.mark.unit
def test_auto_is_the_visible_gpus(two_gpus):
    assert resolve_nproc("auto") == 2


@pytest.mark.unit
@pytest.mark.parametrize("value, expected", [("1", 1), ("2", 2), ("8", 8), (" 3 ", 3)])
def test_numbers_on_cpu(no_gpu, value, expected):
    assert resolve_nproc(value) == expected  # CPU workers are not capped by a GPU count


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "-1", "abc", "", "2.0", "auto2", "AUTO"])
def test_bad_nproc(no_gpu, value):
    with pytest.raises(UserError) as info:
        resolve_nproc(value)
    message = str(info.value)
    assert "--nproc-per-node" in message and len(message.splitlines()) == 1


@pytest.mark.unit
def test_more_workers_than_gpus(two_gpus):
    assert resolve_nproc("2") == 2
    with pytest.raises(UserError, match="--nproc-per-node 3 is more than the 2 GPUs"):
        resolve_nproc("3")
    assert resolve_nproc("3", share_gpus=True) == 3  # parallel.backend=gloo


# --------------------------------------------------------------------------- torchrun_command


@pytest.mark.unit
def test_single_node_command(no_gpu):
    cmd = torchrun_command(CONFIG, OVERRIDES, LaunchOptions(nproc_per_node="2"))
    assert cmd[:3] == TORCHRUN
    assert "--nproc-per-node=2" in cmd
    assert "--nnodes=1" in cmd
    assert "--max-restarts=0" in cmd
    assert "--standalone" in cmd
    assert not any(arg.startswith(("--rdzv", "--node-rank")) for arg in cmd)
    assert cmd[-(4 + len(OVERRIDES)) :] == ["-m", "dist_train.cli", "train", CONFIG, *OVERRIDES]
    args = _torchrun_args(cmd)
    assert args.standalone and args.nproc_per_node == "2" and args.nnodes == "1" and args.max_restarts == 0
    assert args.module and args.training_script == "dist_train.cli"
    assert args.training_script_args == ["train", CONFIG, *OVERRIDES]


@pytest.mark.unit
def test_default_options_use_auto(no_gpu):
    opts = LaunchOptions()
    assert (opts.nproc_per_node, opts.nnodes, opts.node_rank, opts.max_restarts) == ("auto", 1, 0, 0)
    cmd = torchrun_command(CONFIG, [], opts)
    assert "--nproc-per-node=1" in cmd
    assert cmd[-4:] == ["-m", "dist_train.cli", "train", CONFIG]


@pytest.mark.unit
def test_multi_node_command(no_gpu):
    opts = LaunchOptions(
        nproc_per_node="2", nnodes=3, node_rank=2, rdzv_endpoint="10.0.0.1:29500", rdzv_id="job7", max_restarts=4
    )
    cmd = torchrun_command(CONFIG, OVERRIDES, opts)
    assert cmd[:3] == TORCHRUN
    for flag in (
        "--nproc-per-node=2",
        "--nnodes=3",
        "--max-restarts=4",
        "--node-rank=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29500",
        "--rdzv-id=job7",
    ):
        assert flag in cmd
    assert "--standalone" not in cmd
    assert cmd[-(4 + len(OVERRIDES)) :] == ["-m", "dist_train.cli", "train", CONFIG, *OVERRIDES]
    args = _torchrun_args(cmd)
    assert not args.standalone
    assert (args.nnodes, args.node_rank, args.rdzv_backend) == ("3", 2, "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id, args.max_restarts) == ("10.0.0.1:29500", "job7", 4)
    assert args.training_script_args == ["train", CONFIG, *OVERRIDES]


@pytest.mark.unit
def test_one_node_with_an_endpoint_uses_the_rendezvous(no_gpu):
    cmd = torchrun_command(CONFIG, [], LaunchOptions(nproc_per_node="1", rdzv_endpoint="127.0.0.1:29400"))
    assert "--standalone" not in cmd
    assert "--rdzv-endpoint=127.0.0.1:29400" in cmd and "--node-rank=0" in cmd and "--rdzv-id=dist_train" in cmd
    _torchrun_args(cmd)


@pytest.mark.unit
def test_torchrun_flags_come_before_the_module(no_gpu):
    opts = LaunchOptions(nproc_per_node="1", nnodes=2, node_rank=1, rdzv_endpoint="h:1")
    cmd = torchrun_command(CONFIG, ["--weird=1"], opts)
    module_at = cmd.index("dist_train.cli")
    assert cmd[module_at - 1] == "-m"
    assert all(arg.startswith("--") for arg in cmd[3 : module_at - 1])
    assert cmd[module_at + 1 :] == ["train", CONFIG, "--weird=1"]  # overrides are passed through untouched


@pytest.mark.unit
def test_overrides_keep_their_order(no_gpu):
    overrides = [f"k{i}=v{i}" for i in range(10)][::-1]
    cmd = torchrun_command(CONFIG, overrides, LaunchOptions(nproc_per_node="1"))
    assert cmd[-10:] == overrides


@pytest.mark.unit
@pytest.mark.parametrize(
    "opts, needle",
    [
        (LaunchOptions(nproc_per_node="0"), "--nproc-per-node"),
        (LaunchOptions(nproc_per_node="abc"), "--nproc-per-node"),
        (LaunchOptions(nproc_per_node="1", nnodes=2), "--rdzv-endpoint"),
        (LaunchOptions(nproc_per_node="1", nnodes=0), "--nnodes"),
        (LaunchOptions(nproc_per_node="1", nnodes=2, node_rank=2, rdzv_endpoint="h:1"), "--node-rank"),
        (LaunchOptions(nproc_per_node="1", nnodes=2, node_rank=5, rdzv_endpoint="h:1"), "--node-rank"),
        (LaunchOptions(nproc_per_node="1", node_rank=1), "--node-rank"),
        (LaunchOptions(nproc_per_node="1", node_rank=-1), "--node-rank"),
        (LaunchOptions(nproc_per_node="1", max_restarts=-1), "--max-restarts"),
    ],
    ids=[
        "nproc-0",
        "nproc-abc",
        "no-endpoint",
        "nnodes-0",
        "rank-eq-nnodes",
        "rank-gt",
        "rank-1-of-1",
        "rank-neg",
        "restarts-neg",
    ],
)
def test_bad_options(no_gpu, opts, needle):
    with pytest.raises(UserError) as info:
        torchrun_command(CONFIG, [], opts)
    message = str(info.value)
    assert needle in message and len(message.splitlines()) == 1


# --------------------------------------------------------------------------- launch() without starting workers


@pytest.fixture
def fake_torchrun(monkeypatch):
    """Replaces torchrun's entry point; records the parsed arguments it would have run with."""
    import torch.distributed.run as torchrun

    started: list = []
    monkeypatch.setattr(torchrun, "run", lambda args: started.append(args))
    return started


def _cfg(*overrides: str):
    return load_config(CONFIG, list(overrides))


@pytest.mark.unit
def test_launch_prints_and_runs_the_command(no_gpu, fake_torchrun, capsys):
    opts = LaunchOptions(nproc_per_node="2")
    assert launcher.launch(_cfg(*OVERRIDES), CONFIG, OVERRIDES, opts) == 0
    expected = torchrun_command(CONFIG, OVERRIDES, opts)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("+ ")
    assert shlex.split(out[0][2:]) == expected
    (args,) = fake_torchrun  # torchrun got exactly the printed arguments
    assert args.nproc_per_node == "2" and args.standalone and args.module
    assert [args.training_script, *args.training_script_args] == ["dist_train.cli", "train", CONFIG, *OVERRIDES]


@pytest.mark.unit
def test_launch_passes_on_the_failed_worker_exit_code(no_gpu, monkeypatch, capsys):
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failing_run(args):
        failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file="/nonexistent")
        raise ChildFailedError("dist_train.cli", {1: failure, 0: failure})

    monkeypatch.setattr(torchrun, "run", failing_run)
    assert launcher.launch(_cfg(), CONFIG, [], LaunchOptions(nproc_per_node="1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: worker rank 0 exited with code 2; its message is above"]


@pytest.mark.unit
def test_launch_refuses_fp16_without_gpu(no_gpu, fake_torchrun):
    with pytest.raises(UserError, match="train.precision"):
        launcher.launch(_cfg("train.precision=fp16"), CONFIG, [], LaunchOptions(nproc_per_node="1"))
    assert fake_torchrun == []  # refused before torchrun was started


@pytest.mark.unit
def test_launch_checks_options_before_starting(no_gpu, fake_torchrun):
    with pytest.raises(UserError):
        launcher.launch(_cfg(), CONFIG, [], LaunchOptions(nproc_per_node="1", nnodes=2))
    with pytest.raises(UserError, match="parallel.strategy=none"):
        launcher.launch(_cfg("parallel.strategy=none"), CONFIG, [], LaunchOptions(nproc_per_node="2"))
    assert fake_torchrun == []


# --------------------------------------------------------------------------- real torchrun


@pytest.mark.system
def test_launch_one_worker_tiny_run(tmp_path):
    overrides = tiny_overrides(tmp_path)
    proc = run_cli("launch", CONFIG, "--nproc-per-node", "1", *overrides, cwd=REPO, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    plus = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(plus) == 1, proc.stdout
    printed = shlex.split(plus[0][2:])
    assert printed[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=1" in printed and "--standalone" in printed
    assert printed[-(4 + len(overrides)) :] == ["-m", "dist_train.cli", "train", CONFIG, *overrides]
    assert "training 6 steps of global batch 16 (1 x 16 x 1 accumulation)" in proc.stdout
    saved = checkpoint.latest_valid(tmp_path / "runs" / "digits" / "checkpoints")
    assert saved is not None and saved.name == "step_00000006"
    assert (tmp_path / "runs" / "digits" / "metrics.jsonl").is_file()


@pytest.mark.system
def test_launch_worker_side_mistake_is_one_line(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"checkpoint.resume": "/does/not/exist"})
    proc = run_cli("launch", CONFIG, "--nproc-per-node", "1", *overrides, cwd=REPO, timeout=240)
    output = f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert not (tmp_path / "runs").exists(), output
    assert proc.returncode == 2, output
    assert "Traceback" not in proc.stderr, output
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error"), output
    assert "checkpoint.resume" in lines[0] and "/does/not/exist" in lines[0], output


@pytest.mark.system
def test_launch_mistake_only_a_worker_sees_has_no_traceback(tmp_path):
    # Only a worker knows the dataset size: its one-line error, then launch's, and the worker's exit code.
    proc = run_cli(
        "launch",
        CONFIG,
        "--nproc-per-node",
        "1",
        *tiny_overrides(tmp_path, **{"data.batch_size": 2000}),
        cwd=REPO,
        timeout=240,
    )
    output = f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 2, output
    assert "Traceback" not in proc.stderr, output
    assert "fewer than one global batch" in proc.stderr, output
    assert proc.stderr.strip().splitlines()[-1] == "error: worker rank 0 exited with code 2; its message is above"


@pytest.mark.system
def test_two_workers_with_the_same_mistake_print_it_once_and_no_omp_banner(tmp_path):
    # Both ranks find the dataset smaller than one global batch. OMP_NUM_THREADS is left unset,
    # as users leave it: launch sets it, so torchrun's warning banner must not appear.
    env = {k: v for k, v in cli_env().items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train.cli", "launch", CONFIG, "--nproc-per-node", "2"]
        + tiny_overrides(tmp_path, **{"data.batch_size": 1000}),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 2, output
    assert len([line for line in proc.stderr.splitlines() if "fewer than one global batch" in line]) == 1, output
    assert "OMP_NUM_THREADS" not in proc.stderr, output
    cpus = worker_env.available_cpus()
    assert f"{max(1, cpus // 2)} OpenMP thread(s) each" in proc.stdout, output


@pytest.mark.unit
def test_omp_threads_share_the_cpus_unless_the_user_set_them():
    assert worker_env.omp_threads_env({}, 16, 4) == {"OMP_NUM_THREADS": "4"}
    assert worker_env.omp_threads_env({}, 2, 4) == {"OMP_NUM_THREADS": "1"}
    assert worker_env.omp_threads_env({"OMP_NUM_THREADS": "3"}, 16, 4) == {}


@pytest.mark.system
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_to_launch_checkpoints_exits_75_and_the_same_command_continues(tmp_path, sig):
    import json
    import subprocess
    import time

    from conftest import cli_env

    overrides = tiny_overrides(tmp_path, **{"train.max_steps": 1000, "checkpoint.every_steps": 0})
    command = [sys.executable, "-m", "dist_train.cli", "launch", CONFIG, "--nproc-per-node", "2", *overrides]
    proc = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "digits"
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline:  # wait until they train
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err, err
    stopped = json.loads((run_dir / "stopped_early.json").read_text())
    assert stopped["signal"] == sig.name and 0 < stopped["step"] < 1000
    assert f"stopped at step {stopped['step']} on {sig.name}" in out
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [f"step_{stopped['step']:08d}"]

    again = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {stopped['step']}" in again.stdout
    assert not (run_dir / "stopped_early.json").exists()
    assert checkpoint.list_checkpoints(run_dir / "checkpoints")[-1].name == "step_00001000"


@pytest.mark.system
def test_a_killed_worker_is_restarted_and_the_run_finishes_as_if_uninterrupted(tmp_path):
    import subprocess
    import time

    from conftest import cli_env

    def command(name, *extra):
        values = {"run.name": name, "train.max_steps": 1000, "train.log_every": 10, "checkpoint.every_steps": 100}
        overrides = tiny_overrides(tmp_path, **values, **{"parallel.strategy": "ddp"})
        return [sys.executable, "-m", "dist_train.cli", "launch", CONFIG, "--nproc-per-node", "2", *extra, *overrides]

    straight = subprocess.run(command("straight"), cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]

    proc = subprocess.Popen(
        command("crashed", "--max-restarts", "1"),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = tmp_path / "runs" / "crashed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not checkpoint.list_checkpoints(checkpoints) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = launcher.child_pids(proc.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)  # one worker dies mid-run, as on an OOM kill or a hardware fault
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    resumed = re.search(r"resumed from \S+step_(\d{8}) at step", out)
    assert resumed and 0 < int(resumed.group(1)) < 1000, out[-3000:]

    final = {}
    for name in ("straight", "crashed"):
        final[name] = final_model(tmp_path, name)
    for key, tensor in final["straight"].items():
        assert torch.equal(final["crashed"][key], tensor), key


@pytest.mark.system
def test_the_launcher_never_imports_training_code():
    probe = "import sys, dist_train.cli, dist_train.launcher; print('dist_train.train.trainer' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], env=cli_env(), capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == "False", proc.stderr


@pytest.mark.unit
def test_the_worker_that_failed_by_itself_is_reported_not_one_torchrun_terminated():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank: int, exitcode: int) -> ProcessFailure:
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file="/nonexistent")

    terminated, failed, aborted = failure(0, -signal.SIGTERM), failure(1, 2), failure(2, -signal.SIGABRT)
    assert launcher.root_cause({0: terminated, 1: failed, 2: aborted}) == (1, failed)
    assert launcher.root_cause({0: terminated, 2: aborted}) == (2, aborted)
    assert launcher.root_cause({3: terminated, 0: terminated}) == (0, terminated)


@pytest.mark.unit
def test_a_worker_verb_given_nproc_per_node_starts_itself_through_torchrun(no_gpu, fake_torchrun, capsys):
    from dist_train import cli

    assert cli.main(["train", CONFIG, "--nproc-per-node", "2", *OVERRIDES]) == 0
    (args,) = fake_torchrun  # the launch flags stay with the launcher, the rest go to each worker
    assert args.nproc_per_node == "2"
    assert [args.training_script, *args.training_script_args] == ["dist_train.cli", "train", CONFIG, *OVERRIDES]
