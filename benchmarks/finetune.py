"""
What finetuning a pretrained model costs (train.py --config=tinystories): a step at TinyStories-1Layer-21M's
shape, without and with the paper's attention codebooks, and its projection to the paper's run.

    python -m benchmarks.finetune                               # a few minutes on 2 cores
    python -m benchmarks.finetune --train_steps=5 --out=bench_finetune.json
    python -m benchmarks.finetune --quick --out=/tmp/finetune.json   # tiny shapes, seconds: the smoke test

A train.py --config=tinystories step at TinyStories-1Layer-21M's shape (GPT-Neo as
pretrained.load.from_pretrained maps it, random weights, vocab 50,257, block 512, fp32) at a small batch
(--finetune_batch), without and with the paper's attention codebooks (16 heads, C=10k, k=8), beside the
tinystories_scratch preset's shape; seconds a step (the best of --train_steps after a warm-up step, the
three models' steps alternating), memory (benchmarks/measure.py), and the projection to the paper's 100k
steps of batch 96, here and on one H200 (from that preset's H200 figure in results/README.md, section 3).
The models take the tuned search (tuned.use_tuned_search), as train.py's do. The rows run in a fresh
subprocess (`--row=finetune`) with OMP_WAIT_POLICY=passive unless set.
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from benchmarks.measure import fmt, parse_flags, peak_mb, pick_device, print_row, spawn, status_kb, timed
from helpers.common import cpu_name, save_json
from model import GPT, GPTConfig
from tuned import use_tuned_search


@dataclass
class FinetuneConfig:
    finetune_batch: int = 4  # sequences of 512 tokens per timed finetune step
    train_steps: int = 8  # timed steps per model (after a warm-up step)
    threads: int = 0  # torch threads (0: torch's default, all cores)
    omp_wait: str = "passive"  # OMP_WAIT_POLICY of the row, unless already set ("": OpenMP's default)
    device: str = "auto"  # auto, cpu, cuda
    out: str = ""  # write the results as JSON to this path
    quick: bool = False  # tiny shapes (QUICK_FINETUNE), one step: a smoke test in seconds
    row: str = ""  # internal: run the rows here (finetune) and print them as JSON


QUICK = dict(train_steps=1)
# GPT-Neo as from_pretrained maps it (its one layer is global), random weights: the work is the same
FINETUNE = dict(n_layer=1, n_head=16, n_embd=1024, vocab_size=50257, block_size=512, rope=False, qkv_bias=False,
                scale_attn=False, attn_fp32=True, gelu="tanh")
FINETUNE_CB = dict(cb_at="attn", num_codes=10000, k=8)  # the paper's per-head attention codebooks
# the tinystories_scratch preset (2 layers at that width), timed on an H200 (results/README.md, section 3)
SCRATCH = dict(n_layer=2, n_head=16, n_embd=1024, vocab_size=50257, block_size=512, cb_at="attn", num_codes=10000,
               k=8)
SCRATCH_H200 = dict(ms_per_step=119, batch=32)  # bf16, batch 32 x 512
QUICK_FINETUNE = dict(n_head=2, n_embd=64, vocab_size=1000, block_size=64, num_codes=256)
PAPER_STEPS, PRESET_STEPS, PAPER_BATCH = 100_000, 10_000, 96


def parse(argv):
    cfg = parse_flags(argv, FinetuneConfig, QUICK)
    if cfg.row not in ("", "finetune"):
        sys.exit(f"error: --row={cfg.row!r}; valid: finetune (internal), or none")
    return cfg


def finetune_row(cfg, device):
    """Seconds per AdamW step (the best of train_steps after a warm-up step) and memory, for the finetune
    without codebooks, with them, and the tinystories_scratch preset's shape (for the GPU projection). The
    three models' steps alternate, so that a change in the machine's load hits them alike."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    small = QUICK_FINETUNE if cfg.quick else {}
    shapes = dict(finetune_none={**FINETUNE, "cb_at": "none", **small},
                  finetune_attn={**FINETUNE, **FINETUNE_CB, **small}, scratch_attn={**SCRATCH, **small})
    steps, out = {}, {}
    for name, shape in shapes.items():
        torch.manual_seed(0)
        model = use_tuned_search(GPT(GPTConfig(**shape))).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=device == "cuda")
        seq = torch.randint(0, shape["vocab_size"], (cfg.finetune_batch, shape["block_size"] + 1), device=device)

        def step(model=model, optimizer=optimizer, seq=seq):
            _, loss, _, _ = model(seq[:, :-1], seq[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        timed(step, device)  # Adam's state is made here, before the peak below is taken
        steps[name] = step
        out[name] = dict(step_peak_mb=peak_mb(step, device), params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                         batch=cfg.finetune_batch, config=shape)
    times = {name: [] for name in shapes}
    for _ in range(cfg.train_steps):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    for name in shapes:
        out[name].update(s_per_step=min(times[name]), steps=len(times[name]))
    rss = status_kb("VmHWM") if device == "cpu" else None  # all three models, their Adam states, a step
    return dict(rows=out, process_peak_mb=rss / 1024 if rss else torch.cuda.max_memory_allocated() / 2**20
                if device == "cuda" else None, load=os.getloadavg())


def finetune_main(cfg):
    """The finetune rows, in a subprocess, and their projection to the paper's run; as JSON with --out."""
    device = pick_device(cfg.device)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    load_before = os.getloadavg()
    got = spawn("benchmarks.finetune", cfg, "finetune")
    if got is None:
        sys.exit("error: the finetune row failed (above)")
    rows = got["rows"]
    b = cfg.finetune_batch
    print(f"device {device} ({dev_name}), torch {torch.__version__}; a finetune step, batch {b} x "
          f"{rows['finetune_attn']['config']['block_size']}, fp32")
    for name, r in rows.items():
        print(f"{name:14} {r['params_m']:6.1f}M params ({16 * r['params_m']:5.0f} MB of fp32 weights, grads, Adam "
              f"moments)  {r['s_per_step']:8.3f} s/step  step peak {fmt(r['step_peak_mb'], '6.0f')} MB above them")
    print(f"process peak {fmt(got['process_peak_mb'], '.0f')} MB (the three models together); load average "
          "before {:.2f} {:.2f} {:.2f}, at the end {:.2f} {:.2f} {:.2f}".format(*load_before, *got["load"]))
    projection = {}
    for name in ("finetune_none", "finetune_attn"):
        s96 = rows[name]["s_per_step"] * PAPER_BATCH / b  # time is about linear in the batch
        # the H200's figure for the scratch preset, scaled by this machine's finetune / scratch ratio per token
        gpu_ms = SCRATCH_H200["ms_per_step"] / SCRATCH_H200["batch"] * PAPER_BATCH * \
            rows[name]["s_per_step"] / rows["scratch_attn"]["s_per_step"]
        projection[name] = dict(here_s_per_step_b96=s96, here_days_100k=s96 * PAPER_STEPS / 86400,
                                here_days_10k=s96 * PRESET_STEPS / 86400, h200_ms_per_step_b96=gpu_ms,
                                h200_hours_100k=gpu_ms * PAPER_STEPS / 3.6e6, h200_hours_10k=gpu_ms * PRESET_STEPS / 3.6e6)
        p = projection[name]
        print(f"projected, {name}, batch {PAPER_BATCH}: here {s96:.1f} s/step ({p['here_days_100k']:.0f} days for "
              f"{PAPER_STEPS:,} steps, {p['here_days_10k']:.1f} for {PRESET_STEPS:,}); one H200 (bf16) about "
              f"{gpu_ms:.0f} ms/step ({p['h200_hours_100k']:.1f} h, {p['h200_hours_10k']:.1f} h)")
    print("projection: time linear in the batch; the H200's 119 ms/step for tinystories_scratch (batch 32, bf16) "
          "scaled by this run's finetune / scratch_attn time per token. Not measured on a GPU.")
    result = dict(device=device, device_name=dev_name, torch=torch.__version__, config=dataclasses.asdict(cfg),
                  rows=rows, process_peak_mb=got["process_peak_mb"], load_before=load_before, load_after=got["load"],
                  projection=projection)
    if cfg.out:
        save_json(cfg.out, result)
        print(f"wrote {cfg.out}")
    return result


if __name__ == "__main__":
    config = parse(sys.argv[1:])
    if config.row:
        print_row(finetune_row(config, pick_device(config.device)))
    else:
        finetune_main(config)
