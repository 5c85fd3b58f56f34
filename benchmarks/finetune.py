"""
What finetuning a pretrained model costs (train.py --config=tinystories): a step at TinyStories-1Layer-21M's
shape, without and with the paper's attention codebooks, and its projection to the paper's run.

    python -m benchmarks.finetune                               # a few minutes on 2 cores
    python -m benchmarks.finetune --train_steps=5 --out=bench_finetune.json
    python -m benchmarks.finetune --quick --out=/tmp/finetune.json   # tiny shapes, seconds: the smoke test

A train.py --config=tinystories step at TinyStories-1Layer-21M's shape (GPT-Neo as
pretrained.load.from_pretrained maps it, random weights, vocab 50,257, block 512, fp32) at a small batch
(--finetune_batch), without and with the paper's attention codebooks (16 heads, C=10k, k=8), beside the
tinystories_scratch preset's shape, and pythia-70m's shape (GPT-NeoX as map_config maps its config.json,
random weights, vocab 50,304) without and with attention codebooks on all 6 layers; seconds a step (the best of --train_steps after a warm-up step, the
models. steps alternating), memory (benchmarks/measure.py), and the projection to the paper's 100k
steps of batch 96, here and on one H200 (from that preset's H200 figure in results/README.md, section 3),
and of the wikitext preset's Pythia-410M run (Table 2b) from the pythia-70m row, by FLOPs a token.
The models take the tuned search (tuned.use_tuned_search), as train.py's do. The rows run in a fresh
subprocess (`--row=finetune`) with OMP_WAIT_POLICY=passive unless set.
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from benchmarks.measure import fmt, parse_flags, peak_mb, pick_device, print_row, spawn, status_kb, timed, write_result
from helpers.common import cpu_name
from model import GPT, GPTConfig
from pretrained.load import map_config
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
# pythia-70m's config.json as the hub has it, mapped by from_pretrained's own map_config (GPT-NeoX: rotary
# on a quarter of each head, the parallel residual, an untied head, 50,277 tokens padded to 50,304 rows)
PYTHIA_70M = dict(model_type="gpt_neox", hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  max_position_embeddings=2048, intermediate_size=2048, hidden_act="gelu", rotary_pct=0.25,
                  rotary_emb_base=10000, use_parallel_residual=True, tie_word_embeddings=False, vocab_size=50304,
                  layer_norm_eps=1e-5)
PYTHIA = map_config(PYTHIA_70M, "pythia-70m", 512)
PYTHIA_410M = dict(n_layer=24, n_embd=1024)  # Table 2b's model: the wikitext preset's, 24 x 16 heads
WIKITEXT = dict(steps=15_000, batch=24, block=1024)  # the wikitext preset (the official main.yaml)
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
    models. steps alternate, so that a change in the machine's load hits them alike."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    small = QUICK_FINETUNE if cfg.quick else {}
    shapes = dict(finetune_none={**FINETUNE, "cb_at": "none", **small},
                  finetune_attn={**FINETUNE, **FINETUNE_CB, **small}, scratch_attn={**SCRATCH, **small},
                  pythia70m_none={**PYTHIA, **small}, pythia70m_attn={**PYTHIA, **FINETUNE_CB, **small})
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
    rss = status_kb("VmHWM") if device == "cpu" else None  # all the models, their Adam states, a step
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
    print(f"process peak {fmt(got['process_peak_mb'], '.0f')} MB (all the models together); load average "
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
    # Pythia-410M (Table 2b) from the pythia-70m row: time per token scaled by the training FLOPs per token
    # (6 x the blocks' 12 d^2 per layer, plus 6 x the C x d code scores per layer of the attention codebooks)
    def flops(n_layer, n_embd):
        return 6 * n_layer * (12 * n_embd ** 2 + FINETUNE_CB["num_codes"] * n_embd)
    shape = rows["pythia70m_attn"]["config"]
    ratio = flops(**PYTHIA_410M) / flops(shape["n_layer"], shape["n_embd"])
    per_token = rows["pythia70m_attn"]["s_per_step"] / (b * shape["block_size"]) * ratio
    scratch_token = rows["scratch_attn"]["s_per_step"] / (b * rows["scratch_attn"]["config"]["block_size"])
    tokens = WIKITEXT["steps"] * WIKITEXT["batch"] * WIKITEXT["block"]
    h200_h = SCRATCH_H200["ms_per_step"] / (SCRATCH_H200["batch"] * 512) * per_token / scratch_token * tokens / 3.6e6
    projection["pythia410m_attn"] = dict(flops_ratio_to_70m=ratio, here_days=per_token * tokens / 86400,
                                         h200_hours=h200_h, tokens=tokens)
    print(f"projected, Pythia-410M with attention codebooks (wikitext preset, {WIKITEXT['steps']:,} steps of "
          f"{WIKITEXT['batch']} x {WIKITEXT['block']}): {ratio:.1f} x pythia-70m's FLOPs a token; here "
          f"{per_token * tokens / 86400:.0f} days, one H200 (bf16) about {h200_h:.1f} h")
    print("projection: time linear in the batch; the H200's 119 ms/step for tinystories_scratch (batch 32, bf16) "
          "scaled by this run's finetune / scratch_attn time per token. Not measured on a GPU.")
    result = dict(device=device, device_name=dev_name, torch=torch.__version__, config=dataclasses.asdict(cfg),
                  rows=rows, process_peak_mb=got["process_peak_mb"], load_before=load_before, load_after=got["load"],
                  projection=projection)
    return write_result(cfg.out, result)


if __name__ == "__main__":
    config = parse(sys.argv[1:])
    if config.row:
        print_row(finetune_row(config, pick_device(config.device)))
    else:
        finetune_main(config)
