"""
Two jobs at once on a CPU: how much slower a training run gets beside a second one, with OpenMP's threads
spinning as helpers/cpu_threads.py sets them (GOMP_SPINCOUNT=10000), as OpenMP's default, or passive.

    python -m benchmarks.jobs                     # each setting: one run alone, then two side by side
    python -m benchmarks.jobs --settings=ours,default --steps=30
    python -m benchmarks.jobs --settings=ours,20000,default --train_args=--cb_warmup=0   # steps with codebooks;
                                                  # a number is a GOMP_SPINCOUNT to try

A run is `python train.py --max_iters=STEPS` on the default preset (plain steps: its codebooks come at
step 300) with a small evaluation, start-up included; wall clock of the whole command. "pair / alone" is
the wall time of two identical runs side by side over one alone (2.0: the two cores shared perfectly);
"alone / ours" compares one run alone with the same under this project's setting.
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from helpers.common import fail, parse_args, save_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where train.py is
SETTINGS = {  # what each setting puts in a run's environment (None: removed)
    "ours": dict(OMP_WAIT_POLICY=None, GOMP_SPINCOUNT="10000"),
    "default": dict(OMP_WAIT_POLICY=None, GOMP_SPINCOUNT="300000"),  # GNU OpenMP's own default
    "passive": dict(OMP_WAIT_POLICY="passive", GOMP_SPINCOUNT=None),
}


@dataclass
class JobsConfig:
    settings: str = "ours,default,passive"  # comma-separated names from SETTINGS
    steps: int = 60  # training steps of each run
    train_args: str = ""  # more train.py flags for every run, space-separated (--cb_warmup=0: codebook steps)
    out: str = ""  # also write the figures as JSON here


def setting(name):
    """A SETTINGS entry, or for a number that GOMP_SPINCOUNT."""
    return SETTINGS[name] if name in SETTINGS else dict(OMP_WAIT_POLICY=None, GOMP_SPINCOUNT=name)


def run(env, steps, out_dirs, train_args=()):
    """Wall seconds of len(out_dirs) identical training runs started together."""
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), f"--max_iters={steps}",
                               "--eval_interval=1000", "--eval_seqs=64", "--state_seqs=8", f"--out_dir={d}",
                               *train_args],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for d in out_dirs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            fail(f"a training run failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    return time.time() - t0


def main(cfg):
    names = cfg.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS and not n.isdigit()]
    if unknown or cfg.steps < 1:
        fail(f"--settings={cfg.settings} --steps={cfg.steps}: valid settings {', '.join(SETTINGS)} or a spin "
             f"count (a number); steps >= 1")
    train_args = cfg.train_args.split()
    out = dict(steps=cfg.steps, train_args=train_args, cpus=os.cpu_count(), load_before=os.getloadavg(),
               settings={})
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            env = dict(os.environ)
            for key, value in setting(name).items():
                if value is None:
                    env.pop(key, None)
                else:
                    env[key] = value
            alone = run(env, cfg.steps, [os.path.join(tmp, f"{name}-a")], train_args)
            pair = run(env, cfg.steps, [os.path.join(tmp, f"{name}-b"), os.path.join(tmp, f"{name}-c")], train_args)
            out["settings"][name] = dict(alone_s=alone, pair_s=pair, pair_over_alone=pair / alone)
            print(f"{name:8s} one alone {alone:6.1f} s, two side by side {pair:6.1f} s: pair / alone {pair / alone:.2f}",
                  flush=True)
    if "ours" in out["settings"]:
        for name, r in out["settings"].items():
            r["alone_over_ours"] = r["alone_s"] / out["settings"]["ours"]["alone_s"]
            r["pair_over_ours_alone"] = r["pair_s"] / out["settings"]["ours"]["alone_s"]
    out["load_after"] = os.getloadavg()
    print("load average before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(
        *out["load_before"], *out["load_after"]))
    if cfg.out:
        save_json(cfg.out, out)
        print(f"wrote {cfg.out}")
    return out


if __name__ == "__main__":
    main(parse_args(sys.argv[1:], JobsConfig, {"jobs": {}})[0])
