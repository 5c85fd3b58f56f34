"""
How the benchmarks measure, shared by search.py and finetune.py: wall-clock times with the device
synchronised, peak memory of one call, each row run in a fresh subprocess, and the table's number format.

    from benchmarks.measure import fmt, parse_flags, peak_mb, pick_device, spawn, timed
    t = timed(fn, "cuda")            # seconds of one call, torch.cuda.synchronize() around it on CUDA
    mb = peak_mb(fn, "cpu")          # how far one call raises peak memory (MB), None where unknown
    row = spawn("benchmarks.search", cfg, "tiny:layer")   # the row's JSON from `python -m ... --row=...`

Memory: how far one call raises peak memory above what the process holds just before. On CPU: the
resident set's high-water mark (VmHWM), reset through /proc/self/clear_refs after malloc_trim has handed
freed heap back to the OS; on CUDA: torch.cuda.max_memory_allocated above torch.cuda.memory_allocated.
A row's subprocess runs with OMP_WAIT_POLICY=cfg.omp_wait unless set: on a machine shared with other
work, OpenMP's spinning threads otherwise wait a scheduler time slice (~7 ms here) at every parallel op
when another process holds a core, which swamps everything.
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time

import torch

from helpers import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the rows run from here, as `python -m`


def parse_flags(argv, cls, quick):
    """['--quick', '--reps=3'] -> cls instance, by helpers.common.parse_flags (--key=value, a bool alone means
    True, --help prints the running module's docstring and the flags); --quick puts the quick dict's values
    between the dataclass defaults and the command line."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    values, _ = common.parse_flags(argv, defaults, getattr(sys.modules.get("__main__"), "__doc__", None) or "")
    if values.get("quick"):
        values = {**quick, **values}
    return cls(**values)


def write_result(path, result):
    """The results as JSON at path (atomically; nothing without a path), then the results."""
    if path:
        common.save_json(path, result)
        print(f"wrote {path}")
    return result


def pick_device(name):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def status_kb(field):
    """A field of /proc/self/status in kB (VmRSS, VmHWM), or None."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_mb(fn, device):
    """How far one call of fn raises peak memory above what the process holds before it (MB)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so reuse cannot hide growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        return None  # not Linux with glibc: no honest number
    base = status_kb("VmRSS")
    fn()
    return (status_kb("VmHWM") - base) / 1024


def spawn(module, cfg, row):
    """`python -m module` with cfg's flags and --row=row, in a fresh process from the repository's root ->
    the JSON of its last `ROW ` line, or None (and the reason on stderr) if it failed."""
    args = [f"--{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name not in ("row", "out")]
    env = dict(os.environ)
    if cfg.omp_wait and "OMP_WAIT_POLICY" not in env:
        env["OMP_WAIT_POLICY"] = cfg.omp_wait
    proc = subprocess.run([sys.executable, "-m", module, *args, f"--row={row}"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print(f"row {row} failed (exit {proc.returncode}): " + " | ".join(tail), file=sys.stderr)
        return None
    return json.loads(lines[-1][4:])


def print_row(out):
    """What a row's subprocess prints for spawn to read."""
    print("ROW " + json.dumps(out), flush=True)


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(v, spec, unit=""):
    """v formatted by spec plus unit, or '-' right-aligned to the same width."""
    if v is None:
        return "-".rjust(len(format(0.0, spec) + unit))
    return format(v, spec) + unit
