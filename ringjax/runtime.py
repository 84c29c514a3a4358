"""Process-wide settings the `ringjax` command line applies before JAX starts working."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process heap, so each training step reuses it (opt-in:
    RINGJAX_MALLOC=reuse; the command line applies it only then).

    XLA's CPU runtime allocates an execution's temporaries as one large buffer (50 to 650 MiB
    for a MiniLM step); glibc serves a block that large with a fresh `mmap` and unmaps it on free,
    so every step first-touches, and page-faults, every page of it again. With mmap disabled and
    heap trimming off (and one arena, since a thread's arena cannot hold such a block), glibc
    hands the same memory back each step: page faults of `ringjax bench step` (MiniLM Houlsby,
    32 x 64, 10 steps) fall from 1.31-1.33 million to 0.33-0.41 million. It no longer pays: with
    one arena the compiler's and the devices' threads share one malloc lock, and (alternating
    runs, 2 cores) the whole `bench step` process took 26.2 / 24.8 s against 20.7 / 19.0 s with
    glibc's defaults, its step 0.643 / 0.612 against 0.624 / 0.586 s, and the 4-device ring step
    (`bench ring`, M = 8, all unfrozen) 1.00-1.09 s against 0.82-0.97 s. Without the one arena
    the page faults are glibc's defaults' again. The cost when on: the process keeps its peak
    heap. A no-op off glibc. Returns True when applied.
    """
    if os.environ.get("RINGJAX_MALLOC", "").lower() != "reuse" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # one arena: a thread's own arena cannot hold a block above 64 MiB and would mmap it anyway
    return all(mallopt(param, value) for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)))
