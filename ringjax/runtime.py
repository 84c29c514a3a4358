"""Process-wide settings the `ringjax` command line applies before JAX starts working."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process heap, so each training step reuses it.

    XLA's CPU runtime allocates an execution's temporaries as one large buffer (50 to 650 MiB
    for a MiniLM step); glibc serves a block that large with a fresh `mmap` and unmaps it on free,
    so every step first-touches, and page-faults, every page of it again. With mmap disabled and
    heap trimming off (and one arena, since a thread's arena cannot hold such a block), glibc
    hands the same memory back each step: page faults per MiniLM Houlsby step (batch 32 x 64)
    fell from about 135,000 to 18,000 here, and the step from 1.11 s to 0.99 s (median of two
    alternating runs each; within this shared machine's noise). The cost: the process keeps its
    peak heap. A no-op off glibc, or with RINGJAX_MALLOC=system.
    Returns True when applied.
    """
    if os.environ.get("RINGJAX_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # one arena: a thread's own arena cannot hold a block above 64 MiB and would mmap it anyway
    return all(mallopt(param, value) for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)))
