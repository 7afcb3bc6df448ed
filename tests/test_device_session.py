"""benchmarks/device_session.sh is what the first session with a GPU runs, so its plumbing is checked
here: --smoke runs every check on the CPU at tiny sizes through the same script, and a check past
its time box is killed with every process it started."""

from __future__ import annotations

import json
import subprocess

from conftest import REPO, cli_env

CHECKS = ["fsdp_sgd", "fsdp_adamw", "async_checkpoint", "find_batch_oom", "fsdp_cpu_offload_2_ranks", "ddp_2_ranks",
          "nccl_bf16", "nccl_fp16", "resnet50", "gpt2_small_eager", "gpt2_small_compiled"]  # fmt: skip
NEEDS_CUDA = {"nccl_fp16", "gpt2_small_compiled"}  # skipped by --smoke
MEASURED = {"resnet50", "gpt2_small_eager"}  # numbers with a GPU target, none on a CPU


def _session(out, *args: str, timeout: float) -> subprocess.CompletedProcess:
    import sys

    env = cli_env() | {"OUT": str(out), "PYTHON": sys.executable}
    command = ["bash", "benchmarks/device_session.sh", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_device_session_runs_every_check_and_writes_one_json_each(tmp_path):
    proc = _session(tmp_path, "--smoke", "--jobs", "2", timeout=600)  # two at a time: mostly imports
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "environment.json").read_text())["device"].startswith("CPU")
    assert (tmp_path / "session.log").read_text() == proc.stdout  # the whole session, as printed
    results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in CHECKS}
    for name, result in results.items():
        assert result["check"] == name and result["seconds"] <= result["box_s"] + 5, result
        assert "$ " in (tmp_path / f"{name}.log").read_text() or name in NEEDS_CUDA  # its commands and output
        if name in NEEDS_CUDA:
            assert result["passed"] is None and "skipped" in result["note"], result
        elif name in MEASURED:
            assert result["passed"] is None and result["numbers"], result
        else:
            assert result["passed"] is True, result
    found = results["find_batch_oom"]["numbers"]
    assert found["memory_bound"] and found["resumed"] and found["final_step"] == 4
    assert found["micro_batch"] == 10  # the injected out-of-memory edge, 12, less ~10% headroom
    assert len(results["fsdp_cpu_offload_2_ranks"]["numbers"]["grad_norms"]) == 3
    resnet = results["resnet50"]["numbers"]
    assert resnet["ratio"] == resnet["dist_train_samples_per_s"] / resnet["hand_written_samples_per_s"] > 0
    gpt = results["gpt2_small_eager"]["numbers"]
    assert gpt["tokens_per_s"] > 0 and gpt["mfu"] > 0
    assert "| check | passed | numbers | target | seconds |" in proc.stdout  # the markdown table


def test_a_check_past_its_time_box_is_killed_whole_and_the_next_is_skipped(tmp_path):
    proc = _session(tmp_path, "--smoke", "--budget-s", "3", "--min-box-s", "1", "--only", "nccl_bf16", "ddp_2_ranks",
                    timeout=120)  # fmt: skip
    # In the session's order (riskiest first): ddp_2_ranks, then nccl_bf16.
    killed, skipped = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("ddp_2_ranks", "nccl_bf16"))
    assert proc.returncode == 1  # a failed check
    assert killed["passed"] is False and killed["note"].startswith("killed after its time box of 3 s")
    assert skipped["passed"] is None and "of the budget left" in skipped["note"]
    leftover = subprocess.run(["pgrep", "-f", f"run.output_dir={tmp_path}"], capture_output=True, text=True)
    assert leftover.stdout == ""  # torchrun and its worker went with the launcher
