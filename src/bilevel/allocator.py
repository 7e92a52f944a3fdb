"""The C allocator's settings for the long runs of the command line.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and returns it with ``munmap`` when freed. A training loop that allocates the same
large tensor at every iteration (the 10⁵ × 100 float64 rows of one SID minibatch: 80 MB) then
pays for zeroed pages at every iteration: one process of ``benchmarks/distributed.py --cases
sid --features 100`` took 781 285 minor page faults and 2.5 s of system time besides 4.1 s of
user time for four upper steps, and 5 faults and 0.01 s of system time once freed blocks were
kept (user time 2.8 s). :func:`keep_freed_memory` makes ``malloc`` keep them: the process's
resident memory then stays near its peak instead of shrinking between iterations, which is
what a training run wants. The ``bilevel`` command line applies it before a job runs; library
users call it themselves (or set glibc's ``MALLOC_MMAP_MAX_=0``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["OPT_OUT_VARIABLE", "is_glibc", "keep_freed_memory"]

#: ``BILEVEL_MALLOC=system`` leaves the allocator as it is.
OPT_OUT_VARIABLE = "BILEVEL_MALLOC"

_M_TRIM_THRESHOLD = -1  # mallopt parameters of glibc's <malloc.h>
_M_MMAP_MAX = -4
_KEEP = 2**31 - 1  # bytes of free memory at the top of the heap kept (mallopt takes an int)


def is_glibc() -> bool:
    """Whether this process runs on GNU libc."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False


def keep_freed_memory() -> bool:
    """With glibc, serve large blocks from the heap and keep freed memory for reuse
    (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2 GiB)``); returns whether it
    did. Does nothing elsewhere than Linux with glibc, with ``BILEVEL_MALLOC=system``, or
    when the environment already sets glibc's malloc options (``MALLOC_MMAP_MAX_``,
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``)."""
    if os.environ.get(OPT_OUT_VARIABLE, "").strip().lower() == "system":
        return False
    own = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    if any(name in os.environ for name in (*own, "GLIBC_TUNABLES")):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not is_glibc():  # glibc's parameters only (musl's malloc has none of them)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP))
