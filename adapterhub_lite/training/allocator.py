"""Make the C heap give freed tensor memory back to the OS, so that peak RSS tracks the live tensors.

glibc serves a large allocation with its own mmap, but each time such a block is freed it raises the
mmap threshold to that block's size (up to 32 MiB) and serves later blocks of that size from the heap,
which it seldom shrinks. Training on the CPU frees and allocates multi-MiB activations and (4-bit base)
dequantized weights by the thousand each step; once the threshold has risen they fragment the heap,
and RSS climbs step after step. Measured by `benchmarks/qlora_rss_steps.py` (512M-parameter Llama,
QLoRA, gradient checkpointing, 2 threads): training peak 2,287 MiB and RSS still rising after 6 steps
by default, 1,106 MiB and flat with a fixed 1 MiB threshold, at 1.6x the time a step (every fresh
block is page-faulted in again). A fixed threshold turns the dynamic adjustment off, so each block of
at least that size goes back to the OS when freed. Trimming the heap after every layer instead
measured 1,217 MiB at 1.25x the time a step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def low_memory_wanted(low_memory: bool | None, method: str, device: str) -> bool:
    """A recipe's ``low_memory``; unset, it is on for QLoRA on the CPU (memory is why one picks QLoRA)."""
    if low_memory is not None:
        return low_memory
    return method == "qlora" and device == "cpu"


def return_large_blocks_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations of at least ``threshold_bytes`` by mmap and trim the heap above it (glibc only).

    Returns whether the setting took effect; on other C libraries and platforms it does nothing.
    It applies to the whole process and to allocations made after the call.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has no mallopt thresholds)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes)
    )
