"""Process setup: device and backend choice, CUDA math settings, and the host allocator
setting, checked by the page faults it saves."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_train.distributed import backend_for, select_device, use_channels_last
from dist_train.errors import UserError
from dist_train.process_settings import set_cuda_math

# Eight 4 MiB and eight 64 KiB blocks, written and freed, four rounds: the allocation pattern of
# a training step in miniature. Prints the minor page faults of each round after the first.
ROUNDS = """
import ctypes, json, resource, sys
from dist_train.process_settings import retain_freed_host_memory
if sys.argv[1] == "retain":
    assert retain_freed_host_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for size in (4 * 2**20, 64 * 2**10):
        blocks = [libc.malloc(size) for _ in range(8)]
        for block in blocks:
            libc.memset(block, 1, size)
        for block in reversed(blocks):
            libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults[1:]))
"""


def _faults_per_round(mode: str) -> list[int]:
    # glibc's own settings from the environment (the overhead benchmark sets them) would
    # make the default case retain too.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def _huge_pages_always() -> bool:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.is_file() and "[always]" in thp.read_text()


@pytest.mark.multiprocess
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_retained_host_memory_is_reused_without_page_faults():
    default, retained = _faults_per_round("default"), _faults_per_round("retain")
    # Kept memory: later rounds touch only pages the process still holds.
    assert max(retained) < 50
    # glibc's default hands the freed blocks back, so every round faults them all in again
    # (in 2 MiB pages, a few dozen faults, where the kernel backs memory with huge pages).
    pages_per_round = (8 * 4 * 2**20 + 8 * 64 * 2**10) // (2 * 2**20 if _huge_pages_always() else 4096)
    assert min(default) > pages_per_round // 2


def _gpus(monkeypatch, count: int) -> None:
    """Decision logic only: what the device choice does on a machine with `count` GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.unit
def test_each_local_rank_gets_its_own_gpu_and_never_shares_one(monkeypatch):
    _gpus(monkeypatch, 2)
    assert select_device(1, local_world_size=2) == torch.device("cuda", 1)
    # torchrun started by hand with more processes than GPUs: one line, not NCCL's
    # "Duplicate GPU detected" from inside the first collective.
    with pytest.raises(UserError, match="4 processes on this node but 2 GPU"):
        select_device(0, local_world_size=4)
    with pytest.raises(UserError, match="3 processes on this node but 2 GPU"):
        select_device(2, local_world_size=1)  # LOCAL_WORLD_SIZE missing: the rank still tells
    _gpus(monkeypatch, 0)
    assert select_device(3, local_world_size=4) == torch.device("cpu")


@pytest.mark.unit
def test_over_gloo_ranks_may_share_a_gpu(monkeypatch):
    """parallel.backend=gloo: 2 ranks on a workstation's one GPU (NCCL refuses a shared GPU)."""
    _gpus(monkeypatch, 1)
    assert [select_device(rank, 2, share_gpus=True) for rank in (0, 1)] == [torch.device("cuda", 0)] * 2
    _gpus(monkeypatch, 2)
    assert [select_device(rank, 4, share_gpus=True).index for rank in range(4)] == [0, 1, 0, 1]
    assert backend_for(torch.device("cuda", 0), "gloo") == "gloo"


@pytest.mark.unit
def test_cuda_process_groups_carry_cpu_tensors_too():
    # FSDP's CPU offload reduces CPU gradient shards over the default group.
    assert backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert backend_for(torch.device("cpu")) == "gloo"
    torch.distributed.Backend("cpu:gloo,cuda:nccl")  # a backend string torch accepts


@pytest.mark.unit
def test_fsdp_over_gloo_needs_torch_2_8(monkeypatch):
    """torch 2.7's gloo reduce-scatter summed what FSDP asked to average: refused on older torch."""
    import dist_train.parallel as parallel
    from dist_train.config import ConfigError, ParallelConfig

    fsdp, ddp = ParallelConfig(strategy="fsdp"), ParallelConfig(strategy="ddp")
    monkeypatch.setattr(parallel, "TORCH_VERSION", (2, 7))
    with pytest.raises(ConfigError, match=r"^parallel.strategy=fsdp on a CPU \(gloo\) needs torch >= 2.8"):
        parallel.check_backend(fsdp, cuda=False)
    with pytest.raises(ConfigError, match="^parallel.strategy=fsdp on parallel.backend=gloo needs torch >= 2.8"):
        parallel.check_backend(ParallelConfig(strategy="fsdp", backend="gloo"), cuda=True)
    parallel.check_backend(fsdp, cuda=True)  # NCCL
    parallel.check_backend(ddp, cuda=False)
    monkeypatch.setattr(parallel, "TORCH_VERSION", (2, 8))
    parallel.check_backend(fsdp, cuda=False)


@pytest.mark.unit
def test_cuda_math_settings():
    from dist_train.config import TrainConfig

    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        set_cuda_math(TrainConfig(tf32=True))
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark  # auto: on
        set_cuda_math(TrainConfig(tf32=False, cudnn_benchmark=False))
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cudnn.benchmark
        set_cuda_math(TrainConfig(deterministic=True))
        assert not torch.backends.cudnn.benchmark  # auto: off, its choice may differ between runs
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]


@pytest.mark.unit
def test_channels_last_is_for_images_and_by_default_on_cuda():
    cuda, cpu, image, tokens = torch.device("cuda", 0), torch.device("cpu"), (3, 32, 32), (128,)
    assert use_channels_last("auto", cuda, image) and not use_channels_last("auto", cpu, image)
    assert not use_channels_last("auto", cuda, tokens) and not use_channels_last(True, cuda, tokens)
    assert use_channels_last(True, cpu, image) and not use_channels_last(False, cuda, image)
    assert not use_channels_last("auto", cuda, image, sharded=True)  # FSDP2 takes contiguous parameters only
