"""Keep the host memory a training step frees inside the process (glibc's malloc settings).

XLA:CPU allocates a step's scratch (589 MB for a SmolLM2 LoRA step at 2 x 128 tokens) as one
block per execution. glibc serves blocks over 32 MB with a fresh `mmap` and unmaps them on
`free`, so every step faults ~150,000 new pages in and the kernel zeroes them: ~0.4 s of system
time per step on a 2-core Xeon (benchmarks/RESULTS.md section 6). Serving every block from the
heap and never trimming it lets the next step reuse the same pages. The price: memory freed by
the process is not returned to the system until it exits, which suits a training run (it
reaches its peak on every step). The settings only take effect for threads that have not yet
picked a malloc arena, so `mistral-nnx finetune` applies them before JAX starts its backend.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Set glibc's malloc to serve large blocks from one heap that is never trimmed. Returns
    whether it was applied (False off Linux or without glibc's `mallopt`)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # One arena: a thread's own arena cannot grow past 64 MB and would map large blocks anyway.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)
