"""CPU inference without page-fault churn: freed activation memory stays with the process.

glibc's ``malloc`` serves large blocks with ``mmap`` and unmaps them on ``free``, so each forward
pass on CPU maps its activations afresh and the kernel zero-fills them page by page. With a
tiny SALAD at 322 x 322 on 2 cores that is about 800 page faults per image and a quarter of
the forward time (``benchmarks/extract_throughput.py``). Raising glibc's mmap and trim
thresholds keeps freed blocks in the heap for the next batch: the practice of PyTorch's CPU
performance guides (jemalloc / tcmalloc with decay disabled), done here with glibc's own
``mallopt`` so that nothing needs preloading. The cost: the resident size stays at its peak.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

#: Blocks up to this size come from (and return to) the heap instead of fresh mappings.
RETAINED_BYTES = 1 << 30
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def user_configured_malloc() -> bool:
    """Whether the environment already tunes glibc's malloc (``MALLOC_*_`` or ``GLIBC_TUNABLES``)."""
    return "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        name.startswith("MALLOC_") and name.endswith("_") for name in os.environ
    )


@functools.cache
def retain_freed_memory() -> bool:
    """Keep freed blocks below :data:`RETAINED_BYTES` in this process (and processes it forks).

    Applies once per process, on Linux with glibc, unless the user tunes malloc already.
    Returns whether the thresholds are now in effect.
    """
    if not sys.platform.startswith("linux") or user_configured_malloc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, RETAINED_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, RETAINED_BYTES))
