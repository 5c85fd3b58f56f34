"""
Re-measure every GPU figure of the README in one go, one step after another, each in its own process with
its output logged, into one JSON named after the device (results/gpu_report_NVIDIA_H200.json):

    python -m benchmarks.gpu_report                     # on a GPU: the README's commands, below
    python -m benchmarks.gpu_report --size=small        # any machine, under a minute on 2 cores: the smoke test
    python -m benchmarks.gpu_report --steps=bench,bench_fused --out_dir=/tmp/r   # some steps, in the order given
    python -m benchmarks.gpu_report --k="fused or gloo" # the test step on a pytest -k selection (--m=... for -m)

The steps, in this order (the figures first: GPU time is often short), at --size=full (W is --work_dir, a
new temporary directory unless given; --size=small runs each with tiny shapes, a handful of steps and CPU
processes under torchrun; every command runs from the repository's root):

    bench        python -m benchmarks.search --compile=False --reps=3 --budget=4 --out=W/bench.json
    bench_fused  python -m benchmarks.search --compile=False --reps=3 --budget=4 --fused=tf32x3
                     --out=W/bench_fused.json
    fsm_paper    python train.py --config=fsm_paper --max_iters=300 --eval_interval=300 --out_dir=W/fsm_paper
    tinystories  python train.py --config=tinystories_scratch --data_dir=W/random_tokens --cb_warmup=10 --max_iters=110
                     --eval_seqs=128 --out_dir=W/tinystories   # 4M uniform ids below 50,257 as train.bin
    torchrun     python -m torch.distributed.run --standalone --nproc_per_node=1 train.py --max_iters=100
                     --cb_warmup=50 --replace_every=25 --eval_interval=100 --log_interval=25 --out_dir=W/torchrun
    tests        python -m pytest -q -p no:cacheprovider test_all.py -k "not gpu_report"

What each gives (under "steps" in the JSON, with its command, rc, wall_s, log path and the log's tail):
pytest's closing line and counts; benchmarks.search's rows and ratios per shape, from its JSON; step_ms (the last
log interval, evaluation left out), tokens_per_s, val_loss and the rest of train.py's metrics.json. Where
the fused search cannot run (no NVIDIA GPU from Ampere on, no Triton, a CPU without TRITON_INTERPRET=1)
benchmarks.search --fused stops with a one-line error, and the step is recorded as skipped with that line. A
failing step is recorded and the next one runs; the JSON is rewritten (atomically) after every step, and
the exit status is 1 if any step failed. The trainings' ckpt.pt are removed afterwards (--keep_ckpt=True).
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from helpers.common import cpu_name, fail, parse_args, save_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # every step runs from here


@dataclass
class ReportConfig:
    size: str = "full"  # full: the README's GPU commands; small: tiny versions of each, seconds on a CPU
    out_dir: str = "results"  # where gpu_report_<device>.json goes
    work_dir: str = ""  # scratch: logs, bench JSONs, training out_dirs, token data ("": a new temporary dir)
    steps: str = "all"  # comma-separated names from STEPS, run in the order given, or all
    k: str = ""  # pytest -k selection of the test step ("": every test; small: test_jsd); never this script's
    m: str = ""  # pytest -m selection of the test step ("": none)
    timeout: float = 1800.0  # seconds a step may run before it is killed and recorded as failed (0: no limit)
    tail: int = 25  # lines of each step's log kept in the JSON
    keep_ckpt: bool = False  # keep the training steps' ckpt.pt (the tinystories one is ~0.9 GB)


STEPS = ("bench", "bench_fused", "fsm_paper", "tinystories", "torchrun", "tests")  # figures first: GPU time is short
VOCAB = 50257  # GPT-2's, as the tinystories preset has
# per size: the arguments each step adds to its command (small: tiny models, a few steps, CPU processes)
SIZES = {
    "full": dict(
        bench=["--compile=False", "--reps=3", "--budget=4"],
        fsm_paper=["--max_iters=300", "--eval_interval=300"],
        tinystories=["--cb_warmup=10", "--max_iters=110", "--eval_seqs=128"],
        torchrun=["--max_iters=100", "--cb_warmup=50", "--replace_every=25", "--eval_interval=100",
                  "--log_interval=25"],
        tokens=(4_000_000, 262_144)),  # train, val
    "small": dict(
        bench=["--quick", "--shapes=none"],  # the training row: the search's layer rows have their own test
        fsm_paper=["--max_iters=4", "--eval_interval=4", "--eval_seqs=8", "--state_seqs=4", "--batch_size=8",
                   "--n_layer=1", "--num_codes=64", "--compile=False", "--log_interval=2"],
        tinystories=["--cb_warmup=2", "--max_iters=6", "--eval_seqs=8", "--n_layer=1", "--n_head=2", "--n_embd=32",
                     "--block_size=32", "--num_codes=64", "--batch_size=4", "--compile=False", "--log_interval=2"],
        torchrun=["--device=cpu", "--max_iters=6", "--cb_warmup=2", "--replace_every=2", "--eval_interval=6",
                  "--eval_seqs=8", "--state_seqs=4", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16",
                  "--num_codes=64", "--batch_size=8", "--log_interval=2"],
        tokens=(16384, 4096)),
}


def commands(cfg, work):
    """-> {step: argv}, run in the repository's root."""
    py, size = sys.executable, SIZES[cfg.size]
    sel = cfg.k or ("test_jsd" if cfg.size == "small" else "")
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_all.py",  # no recursion into this script
             "-k", f"({sel}) and not gpu_report" if sel else "not gpu_report"] + (["-m", cfg.m] if cfg.m else [])
    train = [py, "train.py"]
    return dict(
        tests=tests,
        bench=[py, "-m", "benchmarks.search", *size["bench"], f"--out={work}/bench.json"],
        bench_fused=[py, "-m", "benchmarks.search", *size["bench"], "--fused=tf32x3", f"--out={work}/bench_fused.json"],
        fsm_paper=[*train, "--config=fsm_paper", *size["fsm_paper"], f"--out_dir={work}/fsm_paper"],
        tinystories=[*train, "--config=tinystories_scratch", f"--data_dir={work}/random_tokens", *size["tinystories"],
                     f"--out_dir={work}/tinystories"],
        torchrun=[py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                  *size["torchrun"], f"--out_dir={work}/torchrun"])


def random_tokens(data_dir, n_train, n_val, seed=0):
    """train.bin / val.bin of uniform ids below VOCAB and the meta.json tinystories_data.load_tokens reads:
    the data do not change the work of a step."""
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(0, VOCAB, n, dtype=np.uint16).tofile(os.path.join(data_dir, f"{split}.bin"))
    meta = dict(encoding=dict(kind="gpt2"), vocab_size=VOCAB, eot=VOCAB - 1, source="random: uniform ids",
                tokens=dict(train=n_train, val=n_val))
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


# -----------------------------------------------------------------------------
# what each step gives: -> (figures, error or "")


def test_figures(log, work):
    lines = [line.strip("= ") for line in log.splitlines() if line.strip()]
    pattern = r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)"
    closing = next((line for line in reversed(lines) if re.search(pattern + r"|no tests ran", line)), None)
    counts = {word: int(n) for n, word in re.findall(pattern, closing or "")}
    return dict(closing_line=closing, **counts), "" if closing else "no pytest summary line in the log"


def bench_figures(name):
    def figures(log, work):
        path = os.path.join(work, f"{name}.json")
        if not os.path.exists(path):
            return {}, f"no {path}"
        result = json.load(open(path))
        shapes = {s: {key: e.get(key) for key in ("N", "G", "d", "C", "k", "rows", "ratios", "goals_met")}
                  for s, e in result["shapes"].items()}
        failed = [f"{s}:{v}" for s, e in shapes.items() for v, row in e["rows"].items() if row is None]
        failed += [] if result.get("train_overhead") else ["train"]
        figures = dict(json=path, device_name=result.get("device_name"), threads=result.get("threads"),
                       shapes=shapes, train=result.get("train"), train_overhead=result.get("train_overhead"),
                       load_before=result.get("load_before"), load_after=result.get("load_after"))
        return figures, f"rows that failed: {', '.join(failed)}" if failed else ""
    return figures


def train_figures(name):
    def figures(log, work):
        path = os.path.join(work, name, "metrics.json")
        if not os.path.exists(path):
            return {}, f"no {path}"
        m = json.load(open(path))
        figures = {key: m.get(key) for key in ("step_ms", "tokens_per_s", "val_loss", "val_acc", "state_acc",
                                                "bayes_loss", "mse", "iters", "wall_s", "device", "world_size")}
        figures.update(alive=(m.get("alive") or {}).get("all"), metrics=path)
        if not (m.get("step_ms") or 0) > 0:
            return figures, "no positive step_ms in metrics.json"
        if name == "torchrun" and not re.search(r"\b1 processes, ", log):  # train.py's line under a process group
            return figures, "train.py did not run as a process group of 1"
        return figures, ""
    return figures


FIGURES = dict(tests=test_figures, bench=bench_figures("bench"), bench_fused=bench_figures("bench_fused"),
               fsm_paper=train_figures("fsm_paper"), tinystories=train_figures("tinystories"),
               torchrun=train_figures("torchrun"))


def run_step(name, argv, work, cfg):
    """Run argv in the repository's root with its output in work/logs/name.log -> the step's record."""
    log_path = os.path.join(work, "logs", f"{name}.log")
    for stale in (os.path.join(work, f"{name}.json"), os.path.join(work, name, "metrics.json")):
        if os.path.exists(stale):  # a reused work_dir: figures come from this run or from none
            os.remove(stale)
    t0, rc = time.time(), None
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        # a session of its own, so that a step past its time goes with its children (torchrun's workers)
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=cfg.timeout or None)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.time() - t0
    text = open(log_path, errors="replace").read()
    record = dict(command=shlex.join(argv), rc=rc, wall_s=round(wall, 2), log=log_path,
                  tail=text.splitlines()[-cfg.tail:], load_after=os.getloadavg())
    if rc is None:
        return dict(record, status="failed", error=f"killed after --timeout={cfg.timeout:g} s")
    refused = re.search(r"^error: --fused=.*needs Triton.*$", text, re.M)  # the search's line where it cannot run
    if name == "bench_fused" and rc != 0 and refused:
        return dict(record, status="skipped", reason=refused.group(0))
    try:
        figures, error = FIGURES[name](text, work)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a half-written or odd output
        figures, error = {}, f"its output could not be read ({type(e).__name__}: {e})"
    ckpt = os.path.join(work, name, "ckpt.pt")
    if os.path.exists(ckpt) and not cfg.keep_ckpt:  # scratch: the figures are in metrics.json
        os.remove(ckpt)
    if rc != 0:
        error = f"exit status {rc}" + (f"; {error}" if error else "")
    return dict(record, figures=figures, status="failed" if error else "ok", **({"error": error} if error else {}))


# -----------------------------------------------------------------------------
# the machine


def machine():
    cuda = torch.cuda.is_available()
    cpu = cpu_name()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:  # read only; absent where the tree is a copy without .git
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                env=dict(os.environ, GIT_OPTIONAL_LOCKS="0")).stdout.strip() or None
    except OSError:
        commit = None
    info = dict(device="cuda" if cuda else "cpu", device_name=torch.cuda.get_device_name(0) if cuda else cpu,
                cpu=cpu, cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                versions=dict(python=platform.python_version(), torch=torch.__version__, triton=triton_version,
                              cuda=torch.version.cuda, numpy=np.__version__),
                env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "TRITON_INTERPRET",
                                                    "CUDA_VISIBLE_DEVICES")},
                commit=commit)
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpus=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                    gpu_memory_gib=round(p.total_memory / 2 ** 30, 1))
    return info


def summary(name, step):
    """A step's outcome in a few words, for the progress line."""
    fig = step.get("figures") or {}
    if step["status"] != "ok":
        return step.get("reason") or step.get("error")
    if name == "tests":
        return fig["closing_line"]
    if name.startswith("bench"):
        return f"{len(fig['shapes'])} shape(s), train_overhead {fig['train_overhead']:.2f}x"
    return f"step_ms {fig['step_ms']:.1f}, {fig['tokens_per_s']:,.0f} tokens/s, val_loss {fig['val_loss']:.4f}"


def main(cfg):
    if cfg.size not in SIZES:
        fail(f"--size={cfg.size}: valid: {', '.join(SIZES)}")
    names = STEPS if cfg.steps == "all" else tuple(cfg.steps.split(","))
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        fail(f"--steps: unknown step {unknown[0]!r}; valid: all, {', '.join(STEPS)}")
    work = os.path.abspath(cfg.work_dir or tempfile.mkdtemp(prefix="gpu_report_"))
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    info = machine()
    path = os.path.join(cfg.out_dir, "gpu_report_" + re.sub(r"[^A-Za-z0-9.-]+", "_", info["device_name"]).strip("_")
                        + ".json")
    report = dict(info, size=cfg.size, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command=shlex.join(["python", "-m", "benchmarks.gpu_report", *sys.argv[1:]]), work_dir=work,
                  load_before=os.getloadavg(), complete=False, steps={})
    print(f"{info['device']} ({info['device_name']}), torch {torch.__version__}, triton "
          f"{info['versions']['triton']}, CUDA {torch.version.cuda}, {info['threads']} threads; "
          f"work dir {work}; writing {path}", flush=True)
    argvs, t0 = commands(cfg, work), time.time()
    for i, name in enumerate(names, 1):
        if name == "tinystories":
            random_tokens(os.path.join(work, "random_tokens"), *SIZES[cfg.size]["tokens"])
        print(f"[{i}/{len(names)}] {name}: {shlex.join(argvs[name])}", flush=True)
        step = report["steps"][name] = run_step(name, argvs[name], work, cfg)
        print(f"[{i}/{len(names)}] {name}: {step['status']} in {step['wall_s']:.1f} s: {summary(name, step)} "
              f"(log {step['log']})", flush=True)
        save_json(path, report)
    failed = [n for n, s in report["steps"].items() if s["status"] == "failed"]
    report.update(load_after=os.getloadavg(), wall_s=round(time.time() - t0, 2), complete=True, failed=failed)
    save_json(path, report)
    print(f"{len(names) - len(failed)} of {len(names)} steps ok" + (f"; failed: {', '.join(failed)}" if failed else "")
          + f"; wrote {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    config, _ = parse_args(sys.argv[1:], ReportConfig, {"report": {}})
    sys.exit(main(config))
