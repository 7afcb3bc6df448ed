"""Every optimizer x strategy x optim.fused x precision x device combination the config accepts
trains, or is refused in one line before any worker starts (tests/optimizer_matrix_worker.py
walks the matrix on real torchrun workers; the `cuda` column trains the kernel choice CUDA makes).
FSDP + fused SGD crashed every GPU run at its first step before `auto` learned where the fused
kernel runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, cli_env, run_cli, tiny_overrides

from dist_train.parallel import FSDP_OVER_GLOO_SINCE, TORCH_VERSION

FSDP_FAMILY = ("fsdp", "hsdp", "fsdp_cpu_offload")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> list[dict]:
    records = []
    for nproc, strategies in ((1, ["none"]), (2, ["ddp", *FSDP_FAMILY])):
        out = tmp_path_factory.mktemp(f"matrix{nproc}") / "cells.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "tests/optimizer_matrix_worker.py", str(out), *strategies]  # fmt: skip
        proc = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
        records += json.loads(out.read_text())
    return records


def _expected_refusal(cell: dict) -> str | None:
    if cell["precision"] == "fp16" and cell["strategy"] in FSDP_FAMILY:  # the config's own check, first
        return "train.precision fp16 is not supported with parallel.strategy=fsdp"
    if cell["strategy"] in FSDP_FAMILY and cell["device"] == "cpu" and TORCH_VERSION < FSDP_OVER_GLOO_SINCE:
        return "parallel.strategy=fsdp on a CPU (gloo) needs torch >= 2.8"
    if cell["precision"] == "fp16" and cell["device"] == "cpu":
        return "train.precision=fp16 needs a CUDA GPU"
    if cell["optimizer"] == "sgd" and cell["fused"] == "true" and cell["strategy"] in FSDP_FAMILY:
        return "optim.fused=true: torch"
    return None


@pytest.mark.multiprocess
def test_every_cell_trains_or_is_refused_in_one_line(matrix):
    assert len(matrix) == 3 * 5 * 3 * 3 * 2  # optimizers, strategies, fused, precisions, devices
    crashed = [cell for cell in matrix if cell["outcome"] == "crashed"]
    assert not crashed, "\n\n".join(f"{c}\n{c['traceback']}" for c in crashed)
    for cell in matrix:
        refusal = _expected_refusal(cell)
        if refusal is not None:
            assert cell["outcome"] == "refused" and cell["message"].startswith(refusal), cell
            assert "\n" not in cell["message"]
        elif cell["precision"] == "fp16":  # accepted for a GPU: benchmarks/device_session.sh trains it
            assert cell["outcome"] == "needs a GPU" and cell["device"] == "cuda", cell
        else:
            assert cell["outcome"] == "trained" and cell["step"] == 2, cell
            assert len(cell["losses"]) == 2 and all(map(math.isfinite, cell["losses"])), cell
            assert ("fused optimizer" in cell["start_line"]) is cell["runs_fused"], cell


@pytest.mark.multiprocess
def test_auto_fuses_on_a_gpu_wherever_the_kernel_runs(matrix):
    for cell in matrix:
        if cell["fused"] == "auto" and cell["outcome"] == "trained":
            on_gpu = cell["device"] == "cuda" and cell["strategy"] != "fsdp_cpu_offload"
            runs_on_dtensor = cell["strategy"] not in FSDP_FAMILY or cell["optimizer"] != "sgd"
            assert cell["runs_fused"] is (on_gpu and runs_on_dtensor), cell
    # FSDP + SGD on a GPU: foreach kernels rather than the fused one DTensor cannot dispatch.
    fsdp_sgd = [c for c in matrix if c["optimizer"] == "sgd" and c["strategy"] == "fsdp" and c["fused"] == "auto"]
    assert {c["outcome"] for c in fsdp_sgd if c["precision"] != "fp16"} == {"trained"}


@pytest.mark.multiprocess
def test_fused_and_unfused_kernels_and_every_strategy_learn_the_same(matrix):
    """Same data and seed: the loss after one update depends on the optimizer, the precision and
    the global batch (one process trains half of two's) only."""
    by_run: dict[tuple, list[float]] = {}
    for cell in matrix:
        if cell["outcome"] == "trained":
            processes = 1 if cell["strategy"] == "none" else 2
            by_run.setdefault((cell["optimizer"], cell["precision"], processes), []).append(cell["losses"][1])
    for (optimizer, precision, _), second_losses in by_run.items():
        reference = second_losses[0]
        tolerance = 1e-5 if precision == "fp32" else 1e-3  # bf16 FSDP casts where autocast does not
        assert all(abs(loss - reference) <= tolerance * reference for loss in second_losses), (optimizer, precision)
    # The optimizers took different steps (else the comparison above says nothing).
    assert len({round(by_run[(name, "fp32", 2)][0], 6) for name in ("sgd", "adam", "adamw")}) == 3


@pytest.mark.system
def test_launch_refuses_fsdp_with_fused_sgd_before_starting_a_worker(tmp_path):
    proc = run_cli(
        "launch", "configs/digits.yaml", "--nproc-per-node", "2", "parallel.strategy=fsdp", "optim.fused=true",
        *tiny_overrides(tmp_path), cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: optim.fused=true: torch " + proc.stderr.split("torch ", 1)[1].split()[0] + " has no fused sgd kernel "
        "for FSDP's sharded (DTensor) parameters; use optim.fused=auto (foreach kernels) or optim.name=adamw"
    ]
    assert "torch.distributed.run" not in proc.stdout  # the torchrun command is printed only when it starts
    assert not (tmp_path / "runs").exists()
