"""
How the CPU runtime behaves, set before torch loads: every script imports this first.

    import helpers.cpu_threads  # noqa: F401  (before torch: OpenMP reads its environment when it loads)

OpenMP's waiting threads. torch's CPU build runs its parallel ops on GNU OpenMP threads, which spin after
each op for GOMP_SPINCOUNT iterations (300,000 by default) before they sleep. On a machine to itself that
saves a wake-up; beside another job (a second training run, a browser) the spinning threads hold the cores
that the other process needs, and every op waits a scheduler slice. With 10,000 spins two jobs side by
side share the cores; one alone pays a little for the earlier sleeps (python -m benchmarks.jobs; results/README.md).
A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept.

glibc's heap (Linux). A training step frees and allocates the same tensors, tens of MB, every step; by
default glibc hands the freed top of its heap back to the OS at once, and the next step takes every page
back through a page fault (about 5,000 a step of the default model, 7 million in its run). Keeping up to
256 MB of freed heap, and taking tensors of up to 32 MB from the heap instead of fresh mmaps, leaves a
few hundred. A user's own MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_THRESHOLD_ is kept.
"""

import ctypes
import os
import sys

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
if sys.platform.startswith("linux") and not {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"} & set(os.environ):
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    except (OSError, AttributeError):  # not glibc (musl, ...): its own allocator's defaults
        pass
