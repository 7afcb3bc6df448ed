"""What `dist-train launch` checks and sets on its node for the workers: the NCCL flight recorder
(and the one line when a worker dies of a signal), CPUs, socket interfaces, and the gloo side
group for stop signals failing in one line instead of hanging."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli_env, tiny_overrides

from dist_train import worker_env
from dist_train.errors import UserError

CONFIG = "configs/digits.yaml"


# --------------------------------------------------------------------------- flight recorder


@pytest.mark.unit
@pytest.mark.parametrize("fr_names", [False, True])
def test_the_flight_recorder_dumps_into_the_run_directory(tmp_path, fr_names):
    added = worker_env.flight_recorder_env({}, tmp_path / "run", fr_names=fr_names)
    prefix = str(tmp_path / "run" / "nccl_flight_recorder" / "rank_")
    if fr_names:  # torch >= 2.10 reads these first and warns about the old names
        expected = {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_FR_DUMP_TEMP_FILE": prefix}
    else:  # torch 2.6-2.9
        expected = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}
    assert added == {**expected, "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


@pytest.mark.unit
def test_which_names_a_torch_version_reads():
    assert not worker_env.reads_fr_names("2.6.0+cu124") and not worker_env.reads_fr_names("2.9.1")
    assert (
        worker_env.reads_fr_names("2.10.0") and worker_env.reads_fr_names("2.14.1") and worker_env.reads_fr_names("3.0")
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "users, kept_away",
    [
        ({"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"}, {"TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE"}),
        ({"TORCH_FR_BUFFER_SIZE": "50"}, {"TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE"}),
        ({"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}, {"TORCH_NCCL_DUMP_ON_TIMEOUT"}),
        ({"TORCH_FR_DUMP_TEMP_FILE": "/scratch/fr_"}, {"TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"}),
    ],
)
def test_a_flight_recorder_setting_the_user_made_is_left_alone(tmp_path, users, kept_away):
    for fr_names in (False, True):
        added = worker_env.flight_recorder_env(users, tmp_path, fr_names=fr_names)
        assert not kept_away & added.keys()
        assert len(added) == 2  # the other two settings are still made


@pytest.mark.system
def test_a_worker_killed_by_sigabrt_gets_one_line_naming_the_dumps_and_the_analyzer(tmp_path):
    env_file = tmp_path / "worker_env.json"
    values = {"model.name": "tests.user_models:aborting", "model.kwargs": json.dumps({"env_file": str(env_file)})}
    env = cli_env() | {"TORCH_FR_BUFFER_SIZE": "77"}  # the user's own value wins
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train.cli", "launch", CONFIG, "--nproc-per-node", "1"]
        + tiny_overrides(tmp_path, **values),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    output = f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 128 + 6, output  # as a shell reports SIGABRT
    prefix = str(tmp_path / "runs" / "digits" / "nccl_flight_recorder" / "rank_")
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker rank 0 was killed by SIGABRT; "), output
    assert f"flight-recorder dump at {prefix}<rank> (none there now" in last, output
    assert f"fr_trace {prefix[: -len('/rank_')]} -p rank_" in last, output
    seen = json.loads(env_file.read_text())  # what the real worker process had
    assert seen["TORCH_FR_BUFFER_SIZE"] == "77" and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in seen
    assert seen["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    name = "TORCH_FR_DUMP_TEMP_FILE" if worker_env.reads_fr_names() else "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"
    assert seen[name] == prefix


@pytest.mark.unit
def test_the_signal_line_counts_dumps_that_are_there(tmp_path):
    folder = tmp_path / "nccl_flight_recorder"
    folder.mkdir()
    for rank in (0, 1):
        (folder / f"rank_{rank}").write_bytes(b"x")
    line = worker_env.killed_by_signal_report(1, "SIGABRT", {"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": f"{folder}/rank_"})
    assert line.startswith("error: worker rank 1 was killed by SIGABRT") and "(2 there now)" in line
    assert "\n" not in line
    off = worker_env.killed_by_signal_report(0, "SIGKILL", {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"})
    assert off.startswith("error: worker rank 0 was killed by SIGKILL (no NCCL flight-recorder dumps")


# --------------------------------------------------------------------------- CPUs


@pytest.mark.unit
def test_the_cpu_line_warns_when_workers_outnumber_cpus():
    assert worker_env.cpu_report(8, 8) == ("launch: 8 CPUs available to this node's 8 worker(s)", False)
    line, warning = worker_env.cpu_report(1, 2)
    assert warning and line.startswith("warning: only 1 CPU(s) available to this node's 2 workers")
    assert "--cpus-per-task" in line


@pytest.mark.system
def test_launch_warns_when_its_workers_get_fewer_cpus_than_there_are_workers(tmp_path):
    # taskset narrows launch to one CPU, as srun without --cpus-per-task does where tasks are
    # bound; torchrun's workers inherit it.
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
        pytest.skip("needs 2 CPUs and taskset")
    overrides = tiny_overrides(tmp_path, **{"parallel.strategy": "ddp", "train.max_steps": 2})
    proc = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-m", "dist_train.cli", "launch", CONFIG, "--nproc-per-node", "2",
         *overrides],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: only 1 CPU(s) available to this node's 2 workers" in proc.stderr


# --------------------------------------------------------------------------- network interfaces


@pytest.mark.unit
def test_socket_interface_names_are_checked_against_this_node():
    names = ["lo", "eth0", "ib0"]
    worker_env.check_socket_ifnames({"GLOO_SOCKET_IFNAME": "eth0,ib0", "NCCL_SOCKET_IFNAME": "ib"}, names)
    worker_env.check_socket_ifnames({"NCCL_SOCKET_IFNAME": "^docker,lo"}, names)  # exclusions only
    worker_env.check_socket_ifnames({"NCCL_SOCKET_IFNAME": "=eth0"}, names)
    with pytest.raises(UserError, match="GLOO_SOCKET_IFNAME=eth0,eth9: no interface eth9"):
        worker_env.check_socket_ifnames({"GLOO_SOCKET_IFNAME": "eth0,eth9"}, names)
    with pytest.raises(UserError, match="NCCL_SOCKET_IFNAME=enp"):
        worker_env.check_socket_ifnames({"NCCL_SOCKET_IFNAME": "enp"}, names)
    with pytest.raises(UserError, match="NCCL_SOCKET_IFNAME==eth"):
        worker_env.check_socket_ifnames({"NCCL_SOCKET_IFNAME": "=eth"}, names)  # exact: eth0 is not eth


@pytest.mark.system
def test_a_bogus_gloo_interface_is_one_line_before_any_worker_starts(tmp_path):
    env = cli_env() | {"GLOO_SOCKET_IFNAME": "nosuchif0"}
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train.cli", "launch", CONFIG, "--nproc-per-node", "2"]
        + tiny_overrides(tmp_path, **{"parallel.strategy": "ddp"}),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: GLOO_SOCKET_IFNAME=nosuchif0: no interface nosuchif0")
    assert not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_a_loopback_host_name_warns_only_for_several_nodes_without_gloo_interface():
    assert worker_env.loopback_warning({}, nnodes=1) is None
    assert worker_env.loopback_warning({"GLOO_SOCKET_IFNAME": "eth0"}, nnodes=2) is None
    warning = worker_env.loopback_warning({}, nnodes=2)
    try:
        loopback = socket.gethostbyname(socket.gethostname()).startswith("127.")
    except OSError:
        loopback = True
    assert (warning is not None) == loopback
    if warning:
        assert warning.startswith("warning: ") and "GLOO_SOCKET_IFNAME" in warning and "\n" not in warning


# --------------------------------------------------------------------------- the stop-signal side group


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode, needle", [("late", "did not form within 2 s"), ("ifname", "nosuchif0")])
def test_a_side_group_that_cannot_form_fails_in_one_line_not_a_hang(mode, needle):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "tests/side_group_worker.py", mode],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error (rank 0): ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "the gloo group for stop signals did not form within 2 s" in errors[0] and needle in errors[0]
    assert "GLOO_SOCKET_IFNAME" in errors[0] and "SOCKET_IFNAME=eth0" in errors[0]
    # No frame of the worker's (torchrun itself prints its ChildFailedError with a traceback).
    assert 'side_group_worker.py", line' not in proc.stderr and "preemption.py" not in proc.stderr
    assert "formed" not in proc.stdout
    assert time.monotonic() - start < 60
