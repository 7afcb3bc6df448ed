"""Process setup: the host allocator setting, checked by the page faults it saves."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Eight 4 MiB and eight 64 KiB blocks, written and freed, four rounds: the allocation pattern of
# a training step in miniature. Prints the minor page faults of each round after the first.
ROUNDS = """
import ctypes, json, resource, sys
from dist_train.distributed import retain_freed_host_memory
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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_retained_host_memory_is_reused_without_page_faults():
    default, retained = _faults_per_round("default"), _faults_per_round("retain")
    # Kept memory: later rounds touch only pages the process still holds.
    assert max(retained) < 50
    # glibc's default hands the freed blocks back, so every round faults them all in again
    # (in 2 MiB pages, a few dozen faults, where the kernel backs memory with huge pages).
    pages_per_round = (8 * 4 * 2**20 + 8 * 64 * 2**10) // (2 * 2**20 if _huge_pages_always() else 4096)
    assert min(default) > pages_per_round // 2
