"""benchmarks/gpu_check.py is run by whoever first gets a GPU, so its plumbing is checked here:
its --smoke mode runs the same checks on the CPU at tiny sizes (a subset, to keep this short)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, cli_env


def test_the_gpu_check_runs_its_checks_and_writes_their_numbers(tmp_path):
    out = tmp_path / "gpu_check.json"
    only = ["nccl", "bf16", "fp16", "gpt2_small eager", "resnet18 32px", "fsdp_cpu_offload"]
    command = [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out), "--only", *only]
    proc = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] and report["environment"]["device"].startswith("CPU")
    checks = report["checks"]
    assert list(checks) == only
    assert checks["nccl"]["passed"] and checks["nccl"]["numbers"]["process_group"] == "gloo"  # the CPU's group
    assert checks["bf16"]["passed"] and checks["bf16"]["numbers"]["last_loss"] < checks["bf16"]["numbers"]["first_loss"]
    assert checks["fp16"]["passed"] is None and "skipped" in checks["fp16"]["note"]
    gpt = checks["gpt2_small eager"]["numbers"]
    assert gpt["tokens_per_s"] > 0 and gpt["mfu"] > 0 and gpt["checkpoint_stall_s"] > 0
    resnet = checks["resnet18 32px"]["numbers"]
    assert resnet["ratio"] == resnet["dist_train_samples_per_s"] / resnet["hand_written_samples_per_s"] > 0
    assert checks["fsdp_cpu_offload"]["passed"] and len(checks["fsdp_cpu_offload"]["numbers"]["grad_norms"]) == 3
    assert "| check | passed | numbers | target | seconds |" in proc.stdout  # the markdown table


def test_a_check_past_the_budget_is_killed_whole_and_the_next_is_skipped(tmp_path):
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out), "--budget-s", "2",
               "--only", "nccl", "bf16"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    checks = json.loads(out.read_text())["checks"]
    assert proc.returncode == 1  # a failed check
    assert checks["nccl"]["passed"] is False and checks["nccl"]["note"].startswith("killed after 2 s")
    assert checks["bf16"]["passed"] is None and "budget" in checks["bf16"]["note"]
    leftover = subprocess.run(["pgrep", "-f", f"run.output_dir={tmp_path}"], capture_output=True, text=True)
    assert leftover.stdout == ""  # torchrun and its worker went with the launcher
