"""Process setup: the host allocator setting, checked by the page faults it saves."""

import json
import platform
import subprocess
import sys

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
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_retained_host_memory_is_reused_without_page_faults():
    pages_per_round = (8 * 4 * 2**20 + 8 * 64 * 2**10) // 4096
    # glibc's default hands the freed blocks back, so every round faults them all in again ...
    assert min(_faults_per_round("default")) > pages_per_round // 2
    # ... and keeps them once told to: later rounds touch only pages the process still holds.
    assert max(_faults_per_round("retain")) < 50
