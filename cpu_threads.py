"""
How OpenMP's threads wait, set before torch loads: every script imports this first.

    import cpu_threads  # noqa: F401  (before torch: OpenMP reads its environment when it loads)

torch's CPU build runs its parallel ops on GNU OpenMP threads, which spin after each op for
GOMP_SPINCOUNT iterations (300,000 by default) before they sleep. On a machine to itself that saves a
wake-up; beside another job (a second training run, a browser) the spinning threads hold the cores that
the other process needs, and every op waits a scheduler slice. With 10,000 spins two jobs side by side
share the cores; one alone pays a little for the earlier sleeps (bench_jobs.py; results/README.md).
A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
