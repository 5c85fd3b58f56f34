"""
What every script shares, and nothing else: `--key=value` and `--help` parsing (into a config dataclass
or a dict of flags), one-line errors, picking a device, progress that shows in a terminal and in a log,
checkpoints and JSON files.
It imports no model code (model.model_from_checkpoint rebuilds a model from a checkpoint).

    from helpers.common import fail, parse_args, parse_flags, pick_device, Progress, save_checkpoint, save_json
    cfg, given = parse_args(sys.argv[1:], TrainConfig, PRESETS)   # --config=NAME picks a preset
    given, rest = parse_flags(sys.argv[1:], FLAGS, __doc__)       # FLAGS a dict: {flag: default}
    ckpt = load_checkpoint("out-fsm/ckpt.pt")                     # torch.load(weights_only=True)
"""

import dataclasses
import json
import os
import platform
import sys
import time

import torch
from tqdm import tqdm


def fail(msg):
    """Stop with a one-line error: what was wrong and what is valid."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# --key=value and --help, checked: no exec, unknown flags rejected with the list of valid ones


def parse_value(key, text, default):
    """text parsed as the type of default; a bool takes true/false/1/0/yes/no."""
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        fail(f"--{key}={text}: expected True or False")
    try:
        return type(default)(text)
    except ValueError:
        fail(f"--{key}={text}: expected {type(default).__name__}")


def exit_on_help(argv, doc, defaults):
    """--help or -h anywhere in argv: print doc, then every flag with its default, and exit 0."""
    if "--help" in argv or "-h" in argv:
        flags = " ".join(f"--{k}={v!r}" for k, v in defaults.items())
        print(doc.strip() + (f"\n\nflags and defaults: {flags}" if flags else ""))
        sys.exit(0)


def parse_flags(argv, defaults, doc, positional=False, where=""):
    """['--top=5', 'L1.mlp:3'] -> ({key: value} of the flags given, each parsed as the type of its default;
    the other arguments, in order). A bool flag alone means True (--synthetic). An argument not starting
    with -- is an error unless positional; where (e.g. ' for show') goes into the unknown-flag error."""
    exit_on_help(argv, doc, defaults)
    given, rest = {}, []
    for arg in argv:
        if positional and not arg.startswith("--"):
            rest.append(arg)
            continue
        key, eq, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not eq and isinstance(defaults.get(key), bool):
            text = "True"  # a bool flag alone: --synthetic
        elif not eq:
            fail(f"bad argument {arg!r}: expected --key=value")
        if key not in defaults:
            fail(f"unknown flag --{key}{where}; valid: {', '.join(defaults)}")
        given[key] = parse_value(key, text, defaults[key])
    return given, rest


def parse_args(argv, cls, presets, doc=None):
    """['--config=fsm', '--k=4'] -> (cls instance, the keys given on the command line). The first preset
    is the default; a preset's values sit between the dataclass defaults and the command line. --help
    prints doc (by default the docstring of the script being run) and the flags."""
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    if doc is None:
        doc = getattr(sys.modules.get("__main__"), "__doc__", None) or ""
    first = next(iter(presets))
    preset = next((a[len("--config="):] for a in reversed(argv) if a.startswith("--config=")), first)
    if preset not in presets:
        fail(f"--config={preset}: unknown preset; valid: {', '.join(presets)}")
    # --help shows the values a run starts from: the preset's over the dataclass defaults
    exit_on_help(argv, doc.strip() + f"\n\npresets (--config=NAME, the first is the default): {', '.join(presets)}",
                 {"config": preset, **fields, **presets[preset]})
    given, _ = parse_flags(argv, dict(config=first, **fields), doc)
    given.pop("config", None)
    return cls(**{**fields, **presets[preset], **given}), set(given)


def pick_device(name):
    """'auto' -> cuda if there is one, else mps, else cpu; any other name as it is."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_name():
    """The CPU's model name (/proc/cpuinfo on Linux), for results files."""
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        if names:
            return names[0]
    return platform.processor() or platform.machine()


# -----------------------------------------------------------------------------
# progress: a tqdm bar on a terminal; in a log (nohup, a job's stdout) a plain line every `every` seconds


class Progress:
    def __init__(self, total, desc, initial=0, every=30.0, quiet=False):
        self.total, self.desc, self.n, self.every, self.quiet = total, desc, initial, every, quiet
        self.tty = sys.stderr.isatty() and not quiet
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True) if self.tty else None
        self.t0 = self.last = time.time()
        self.n0, self.postfix = initial, ""

    def update(self, n=1):
        self.n += n
        if self.bar is not None:
            return self.bar.update(n)
        if self.quiet:
            return
        now = time.time()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            print(f"{self.desc}: {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%) "
                  f"{rate:.2f} it/s, {now - self.t0:.0f} s elapsed, ETA {eta:.0f} s{self.postfix}", flush=True)

    def set_postfix(self, **kw):
        if self.bar is not None:
            return self.bar.set_postfix(**kw)
        self.postfix = "".join(f", {k} {v}" for k, v in kw.items())

    def write(self, line):
        if self.bar is not None:
            return self.bar.write(line)
        if not self.quiet:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# -----------------------------------------------------------------------------
# checkpoints and JSON: atomic writes; checkpoints: weights_only reads


def save_checkpoint(path, obj):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the old checkpoint whole


def save_json(path, obj):
    """obj as indented JSON at path, atomically as save_checkpoint (metrics.json, results files)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
