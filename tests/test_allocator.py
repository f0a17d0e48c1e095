"""Freed CPU memory stays with the process, so the next batch does not fault its pages in again."""

import os
import subprocess
import sys

from vprhub.allocator import user_configured_malloc

PAGE = os.sysconf("SC_PAGE_SIZE")
BLOCK = 64 << 20  # above glibc's largest automatic mmap threshold (32 MiB)

# Optionally builds a CPU Embedder, then mallocs, fills and frees a block twice and prints the
# page faults of the second time.
SCRIPT = f"""
import ctypes, resource, sys
if sys.argv[1] == "embedder":
    import vprhub
    from vprhub.embedding import Embedder
    Embedder(vprhub.build_model("salad"), device="cpu")
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def fill_and_free():
    block = libc.malloc({BLOCK})
    ctypes.memset(block, 1, {BLOCK})
    libc.free(block)
fill_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_second_block(mode: str, **env: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return int(result.stdout)


def test_a_cpu_embedder_keeps_freed_blocks_for_reuse():
    pages = BLOCK // PAGE
    assert faults_of_second_block("plain") >= pages // 2  # glibc unmapped the block: its pages fault again
    assert faults_of_second_block("embedder") < pages // 100


def test_a_user_tuned_malloc_is_left_alone(monkeypatch):
    for name in [n for n in os.environ if n.startswith("MALLOC_") or n == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    assert not user_configured_malloc()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert user_configured_malloc()
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert user_configured_malloc()
    assert faults_of_second_block("embedder", GLIBC_TUNABLES="glibc.malloc.trim_threshold=0") >= BLOCK // PAGE // 2
