"""glibc's allocator told to keep freed memory: every chatforge command sets it up first.

Why: by default glibc hands a freed block of a few megabytes (an activation, a chunk of logits) back to
the kernel, and the next step's block of the same size page-faults in again, page by page. On a 2-core
Xeon that was a quarter to a third of a 2x128 model's training step: 1.3-1.5x tokens/s without it, and
~1.5x for `chatforge eval`'s batched generation (bench/README.md). The settings are glibc's own
(`mallopt`), the effect is what preloading jemalloc or tcmalloc gives in Intel's CPU recipes: blocks up
to 32 MB come from the heap, and its free top is kept. The process keeps the memory it once used (its
RSS stays near its peak), as with those allocators. Left alone when the environment already chooses (a
`MALLOC_*` variable, malloc tunables in GLIBC_TUNABLES, a preloaded allocator) and off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20   # the largest glibc accepts on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: "never", in practice


def environment_chooses() -> bool:
    env = os.environ
    return (any(name.startswith("MALLOC_") for name in env) or "malloc" in env.get("GLIBC_TUNABLES", "")
            or any(lib in env.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")))


def keep_freed_memory() -> bool:
    """Set glibc's thresholds as above; True when they were set."""
    if not sys.platform.startswith("linux") or environment_chooses():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc: no library search at start-up
    except (OSError, AttributeError):  # a libc without mallopt: nothing to set (musl has one that does nothing)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
