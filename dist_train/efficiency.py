"""What a step costs: model FLOPs utilization against the device's peak, and the memory each
rank spends on parameters and optimizer state (what FSDP shards)."""

from __future__ import annotations

import torch
from torch import nn

# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets, matched against
# torch.cuda.get_device_name. Sparse figures are twice these; MFU conventions use dense.
PEAK_BF16_TFLOPS = (
    # First match wins: a longer name before any name it contains (H200 NVL, H200, H20).
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800 PCIe", 756.0),
    ("H800", 989.0),  # SXM: the H100 SXM's compute, export-limited links
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 70.0),  # AWS g5
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """One device's peak FLOP/s: the configured figure, else the GPU's by name; None on CPU
    or an unknown GPU, where MFU is not reported."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for marker, tflops in PEAK_BF16_TFLOPS:
        if marker in name:
            return tflops * 1e12
    return None


def flops_per_token(model: nn.Module) -> int | None:
    """Training FLOPs per token for models that state them (GPT); None for the rest."""
    count = getattr(model, "flops_per_token", None)
    return count() if callable(count) else None


def mfu(tokens_per_s_per_device: float, flops_per_token: int, peak: float) -> float:
    """Model FLOPs utilization: the FLOP/s the model's arithmetic needs at this throughput,
    over the peak. Recomputation (activation checkpointing) does not count as useful work."""
    return tokens_per_s_per_device * flops_per_token / peak


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP parameters and their state), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (gathered: a collective), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def param_and_optimizer_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state this rank holds (its shards under FSDP)."""

    def local_bytes(tensor: torch.Tensor) -> int:
        local = local_shard(tensor)
        return local.numel() * local.element_size()

    params = sum(local_bytes(p) for p in model.parameters())
    slots = (v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))
    return params + sum(local_bytes(v) for v in slots)


def device_memory(stats: dict[str, int]) -> dict[str, float]:
    """What the CUDA caching allocator says about an interval (torch.cuda.memory_stats): the
    peak allocated by tensors, the peak reserved from the device (what runs out first: freed
    blocks stay cached and can fragment), and how often an allocation failed, emptied the
    cache and retried. Retries are the warning before an out-of-memory error: each one
    synchronises the device, and they are counted since the process started."""
    return {
        "max_memory_gb": stats.get("allocated_bytes.all.peak", 0) / 2**30,
        "max_reserved_gb": stats.get("reserved_bytes.all.peak", 0) / 2**30,
        "alloc_retries": float(stats.get("num_alloc_retries", 0)),
    }
