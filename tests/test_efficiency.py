"""MFU inputs (peak by device name, FLOPs per token) and per-rank state bytes."""

from __future__ import annotations

import pytest
import torch

from dist_train.efficiency import device_memory, flops_per_token, mfu, param_and_optimizer_bytes, peak_flops
from dist_train.gpt import GPT

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H800", 989.0),
        ("NVIDIA H800 PCIe", 756.0),
        ("NVIDIA H20", 148.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Some Future GPU", None),
    ],
)
def test_peak_is_looked_up_by_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    expected = None if tflops is None else tflops * 1e12
    assert peak_flops(torch.device("cuda", 0), None) == expected


def test_no_peak_on_cpu_unless_configured():
    assert peak_flops(torch.device("cpu"), None) is None
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12


def test_mfu_is_achieved_model_flops_over_peak():
    model = GPT(vocab_size=256, context=64, n_layer=2, n_head=2, width=64)
    per_token = flops_per_token(model)
    assert per_token == model.flops_per_token()
    assert mfu(1000.0, per_token, 1e12) == pytest.approx(1000.0 * per_token / 1e12)
    assert flops_per_token(torch.nn.Linear(2, 2)) is None  # only models that state their FLOPs


def test_param_and_optimizer_bytes_counts_adam_slots():
    model = torch.nn.Linear(10, 10)  # 110 fp32 parameters
    optimizer = torch.optim.AdamW(model.parameters())
    assert param_and_optimizer_bytes(model, optimizer) == 110 * 4
    model(torch.randn(2, 10)).sum().backward()
    optimizer.step()  # creates exp_avg and exp_avg_sq, and a scalar step per parameter
    assert param_and_optimizer_bytes(model, optimizer) == 3 * 110 * 4 + 2 * 4


def test_device_memory_reads_the_allocators_peaks_and_retries():
    # The keys as torch documents them (read from its own docstring: no CUDA here to ask).
    documented = torch.cuda.memory_stats.__doc__
    assert "num_alloc_retries" in documented
    for family in ("allocated_bytes", "reserved_bytes"):
        assert f'``"{family}.{{all,large_pool,small_pool}}.{{current,peak,allocated,freed}}"``' in documented
    stats = {"allocated_bytes.all.peak": 3 * 2**30, "reserved_bytes.all.peak": 4 * 2**30, "num_alloc_retries": 2}
    assert device_memory(stats) == {"max_memory_gb": 3.0, "max_reserved_gb": 4.0, "alloc_retries": 2.0}
