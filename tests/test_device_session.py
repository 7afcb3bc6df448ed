"""benchmarks/device_session.sh is what the first session with a GPU runs, so its plumbing is checked
here: --smoke runs every check on the CPU at tiny sizes through the same script, and a check past
its time box is killed with every process it started."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import REPO, cli_env

pytestmark = pytest.mark.system

CHECKS = ["fsdp_sgd", "fsdp_adamw", "async_checkpoint", "find_batch_oom", "fsdp_cpu_offload_2_ranks", "ddp_2_ranks",
          "nccl_bf16", "nccl_fp16", "resnet50", "gpt2_small_eager", "gpt2_small_compiled"]  # fmt: skip
NEEDS_CUDA = {"nccl_fp16", "gpt2_small_compiled"}  # skipped by --smoke
MEASURED = {"resnet50", "gpt2_small_eager"}  # numbers with a GPU target, none on a CPU


def _session(tmp_path, *args: str, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """device_session.sh with OUT=tmp_path/out and its scratch (the runs) under tmp_path/scratch."""
    import sys

    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    env = cli_env() | {"OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(scratch)} | env
    command = ["bash", "benchmarks/device_session.sh", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout), out


def _checks(out) -> dict[str, dict]:
    """Each check's JSON from OUT/checks.tar.gz, by name."""
    with tarfile.open(out / "checks.tar.gz") as archive:
        names = [m.name for m in archive.getmembers()]
        found = {n: json.load(archive.extractfile(n)) for n in names if n.endswith(".json")}
        logs = {n: archive.extractfile(n).read().decode() for n in names if n.endswith(".log")}
    return {Path(n).stem: {**record, "log": logs[n.removesuffix(".json") + ".log"]} for n, record in found.items()}


def test_the_device_session_runs_every_check_and_writes_one_json_each(tmp_path):
    proc, out = _session(tmp_path, "--smoke", "--jobs", "2", timeout=900)  # two at a time: mostly imports
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # What comes back from a lent GPU machine: at most 8 files.
    assert sorted(p.name for p in out.iterdir()) == [
        "checks.tar.gz", "environment.json", "results.json", "session.log"
    ]  # fmt: skip
    assert json.loads((out / "environment.json").read_text())["device"].startswith("CPU")
    assert (out / "session.log").read_text() == proc.stdout  # the whole session, as printed
    results, archived = json.loads((out / "results.json").read_text()), _checks(out)
    assert list(results) == CHECKS and sorted(archived) == sorted(CHECKS)
    for name, result in results.items():
        assert {**result, "check": name} == {k: v for k, v in archived[name].items() if k != "log"}
        assert result["seconds"] <= result["box_s"] + 5, result
        assert "$ " in archived[name]["log"] or name in NEEDS_CUDA  # its commands and their output
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


def test_a_check_the_budget_cuts_short_is_killed_whole_and_the_next_is_skipped(tmp_path):
    """A 12 s budget: ddp_2_ranks, held to 100,000 steps whatever the machine's speed, is killed
    with its torchrun agent and workers; nccl_bf16 finds no time left. Cut short by the budget,
    not failed: exit 0."""
    proc, out = _session(tmp_path, "--smoke", "--budget-s", "12", "--min-box-s", "1", "--only", "nccl_bf16",
                         "ddp_2_ranks", timeout=120, GPU_CHECK_EXTRA_OVERRIDES="train.max_steps=100000")  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert list(results) == ["ddp_2_ranks", "nccl_bf16"]  # the session's order: riskiest first
    cut, skipped = results["ddp_2_ranks"], results["nccl_bf16"]
    assert cut["passed"] is None and re.match(r"cut short by the session's budget of \d+ s", cut["note"]), cut
    assert "torch.distributed.run" in _checks(out)["ddp_2_ranks"]["log"]  # torchrun had started
    assert skipped["passed"] is None and "of the budget left" in skipped["note"]
    # Every command's run.output_dir is under the scratch folder: no process of the session is left.
    assert str(tmp_path / "scratch") not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
