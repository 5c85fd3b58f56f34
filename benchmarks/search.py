"""
Speed and memory of the codebook layer, side by side with an official-style reference and the bare
score matmul, plus what codebooks cost a training step.

    python -m benchmarks.search                  # CPU: three shapes + training, a few minutes on 2 cores;
                                                 # GPU: the four GPU shapes (the paper's batches) + training
    python -m benchmarks.search --out=bench.json               # also write the table, with its ratios, as JSON
    python -m benchmarks.search --quick --out=/tmp/bench.json  # tiny shapes, seconds: the smoke test
    python -m benchmarks.search --shapes=lm --compile=False --threads=1 --reps=3
    python -m benchmarks.search --shapes=lm_gpu --tile_elems=67108864  # try another tiled.PLANS setting
    python -m benchmarks.search --fused=tf32x3 --out=bench_fused.json  # GPU: the fused Triton search
                                                                       # (tuned/triton_kernels.py)
A finetune step of TinyStories-1Layer-21M has a script of its own: python -m benchmarks.finetune.

Rows, per shape (N tokens, G groups of width d, C codes per group, k codes per token):
  reference  an official-style codebook (taufeeque9/codebook-features, written again here): one head at
             a time in a Python loop, each with its own LayerNorm, the head's full (N, C) cosine-score
             matrix at once, topk, mean of the k code vectors by F.embedding, and a custom backward that
             is straight-through for the input and gives the codes the output gradient plus the MSE
             gradient, both by autograd (the official 'aeloss'). Without the official per-call host
             copies (code counts, mse.item()), which would only slow it down.
  layer      codebook.CodebookLayer, eager, with the tuned search (tuned.use_tuned_search(layer): the search,
             LayerNorm and scatter of tuned/tiled.py);
  plain      CodebookLayer as it is: codebook.py's plain search and LayerNorm (plain_vs_layer: its time
             over the tuned layer's); compiled: CodebookLayer(compile=True) with the tuned search, compiled.
             With --fused (or a plan whose `fused` is set) on a GPU, the search is tuned/triton_kernels.py's; the
             row then also gives `unproven`, the fraction of (token, group) rows its proof left to the
             exact kernel.
  matmul     the bare score matmul, the irreducible work: per head, (N, d) @ (d, C) into one preallocated
             (N, C) buffer (the codes already normalised and laid out (d, C)), forward only. It is the
             irreducible work of forward + backward too: a codebook's backward never touches the scores
             (straight-through to the input, a scatter onto the k chosen codes for the codebook), so
             "vs matmul" is the layer's forward + backward time over the matmul's forward time.
Times: the best of --reps calls after one warm-up call (fewer reps for rows slower than --budget seconds;
the best is the call least disturbed by other work on the machine),
wall clock, with torch.cuda.synchronize() around each call on CUDA. Inputs require grad, as inside a
network; "fwd" is the forward alone (autograd recording), "fwd+bwd" adds backward() of a fixed random
output gradient; parameter and input gradients are set to None before each call.
Memory: "peak MB" is how far one forward + backward raises peak memory above what the process holds just
before (parameters, inputs; the gradients the call creates count), as benchmarks/measure.py's peak_mb
takes it. For the matmul row the (N, C) buffer is allocated inside the measured call.
Training: train.py's default, the fsm preset, 2 layers (its sizes and optimiser written out in TRAIN below,
which a test keeps equal to that preset; --quick shrinks it): microseconds per token of a training step
(forward, backward, grad clip, AdamW with train.py's parameter groups; data sampling excluded), the best of
--train_steps steps after 2 warm-up steps, with the preset's codebooks and with cb_at=none (both models in
one process, steps alternating, both given the tuned search as train.py does); train_overhead = codebook /
plain. Between the steps, the model's codebook layers alone (forward + backward), their searches alone, and
the searches' bare score matmuls (timed as the matmul rows): train_overhead_floor = 1 + (layers - searches
+ matmuls) / the plain step's time, the overhead if a search cost no more than scoring every code at that
speed.
Every row runs in a fresh subprocess (`--row=...`), one after another, with OMP_WAIT_POLICY=passive
unless set: on a machine shared with other work, OpenMP's spinning threads otherwise wait a scheduler
time slice (~7 ms here) at every parallel op when another process holds a core, which swamps everything
(it made a 2-thread search 40x slower than a 1-thread one). Wall-clock timings on a shared machine are
noisy: compare rows of one run, not runs.
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import copy
import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.measure import fmt, parse_flags, peak_mb, pick_device, print_row, ratio, spawn, timed, write_result
from codebook import CodebookLayer
from fsm_data import FSM
from helpers.common import cpu_name
from model import GPT, GPTConfig
from tuned import tiled, triton_kernels, use_tuned_search


@dataclass
class BenchConfig:
    shapes: str = "auto"  # comma-separated names from SHAPES (auto: CPU_SHAPES on a CPU, GPU_SHAPES on a GPU;
    # none: only the training row)
    reps: int = 5  # timed calls per row and mode (fewer when a call is slower than budget / reps)
    budget: float = 15.0  # seconds of timed calls per row and mode, about
    compile: bool = True  # also time CodebookLayer(compile=True)
    train_steps: int = 8  # timed training steps per model (after 2 warm-up steps)
    threads: int = 0  # torch threads (0: torch's default, all cores)
    omp_wait: str = "passive"  # OMP_WAIT_POLICY of the rows, unless already set ("": OpenMP's default)
    device: str = "auto"  # auto, cpu, cuda
    out: str = ""  # write the results as JSON to this path
    quick: bool = False  # tiny shapes, one rep, a tiny training config: a smoke test in seconds
    tile_elems: int = 0  # try another tiled.PLANS setting for this device (0: keep the plan's)
    block_k1: int = 0
    k1_blocks: int = 0  # e.g. 2048: top-1 over 1024 codes by a plain max, the AVX-512 plan
    block: int = 0
    fused: str = ""  # the fused Triton search (CUDA): tf32x3, tf32, ieee, or none ("": keep the plan's)
    fused_tile: str = ""  # its program's tokens,codes,warps, e.g. 64,64,4 ("": keep the plan's)
    row: str = ""  # internal: run one row (shape:variant, or train) here and print it as JSON


# (N tokens, G groups, d width, C codes, k)
SHAPES = {
    "fsm": (8192, 4, 32, 10000, 1),  # TokFSM attention codebooks at the paper's size: 4 heads x 32, C=10k, k=1
    "lm": (4096, 16, 64, 10000, 8),  # TinyStories-style attention codebooks: 16 heads x 64, C=10k, k=8
    "large": (2048, 16, 64, 100000, 8),  # a 100k-code codebook
    "tiny": (256, 2, 16, 300, 2),  # --quick
    # a GPU: the paper's training batches (TokFSM: 512 x 128 tokens; TinyStories-style: 32 x 512)
    "fsm_attn": (65536, 4, 32, 10000, 1),  # TokFSM attention site
    "fsm_mlp": (65536, 1, 128, 10000, 1),  # TokFSM MLP site
    "lm_gpu": (16384, 16, 64, 10000, 8),  # TinyStories-style attention site
    "big": (4096, 16, 64, 100000, 8),  # a 100k-code codebook
}
CPU_SHAPES, GPU_SHAPES = "fsm,lm,large", "fsm_attn,fsm_mlp,lm_gpu,big"
GOALS = dict(speedup_vs_reference=3.0, vs_matmul=2.0, memory_vs_reference=0.5)  # on a GPU: >=, <=, <=
QUICK = dict(shapes="tiny", reps=1, compile=False, train_steps=1)
# train.py's default (the fsm preset, 2 layers), what the training row times
TRAIN = dict(n_layer=2, n_head=4, n_embd=128, block_size=128, cb_at="attn+mlp", num_codes=1024, k=1,
             batch_size=64, learning_rate=5e-3, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
             num_states=100, num_edges=10, fsm_seed=42, seed=1337)
QUICK_TRAIN = dict(batch_size=4, n_layer=1, num_codes=64)  # TRAIN overrides for --quick
VARIANTS = ("reference", "layer", "plain", "compiled", "matmul")


def parse(argv):
    if any(arg == "--finetune" or arg.startswith("--finetune=") for arg in argv):
        sys.exit("error: --finetune: the finetune rows are a script of their own, python -m benchmarks.finetune")
    cfg = parse_flags(argv, BenchConfig, QUICK)
    if cfg.fused not in ("", "none", "tf32x3", "tf32", "ieee"):
        sys.exit(f"error: --fused={cfg.fused!r}; valid: tf32x3, tf32, ieee, none")
    if cfg.fused not in ("", "none") and not triton_kernels.available(torch.device(pick_device(cfg.device))):
        sys.exit(f"error: --fused={cfg.fused} needs Triton and an NVIDIA GPU from Ampere (sm_80) on (on a CPU: "
                 "Triton's interpreter, TRITON_INTERPRET=1, for tests)")
    if cfg.fused_tile and not re.fullmatch(r"\d+,\d+,\d+", cfg.fused_tile):
        sys.exit(f"error: --fused_tile={cfg.fused_tile!r}; valid: tokens,codes,warps, e.g. 64,64,4")
    if cfg.shapes == "auto":
        cfg.shapes = GPU_SHAPES if pick_device(cfg.device) == "cuda" else CPU_SHAPES
    unknown = [s for s in shape_names(cfg) if s not in SHAPES]
    if unknown:
        sys.exit(f"error: unknown shape {unknown[0]!r}; valid: {', '.join(SHAPES)}, or none")
    return cfg


def shape_names(cfg):
    """The layer rows' shapes: --shapes as a list (none: no layer rows, only the training row)."""
    return [] if cfg.shapes == "none" else cfg.shapes.split(",")


# -----------------------------------------------------------------------------
# the official-style reference


class RefSnap(torch.autograd.Function):
    """One head: every cosine score at once, topk, mean of the codes; the official custom backward."""

    @staticmethod
    def forward(ctx, x, codebook, k):
        scores = x @ F.normalize(codebook, dim=-1).T  # (N, C): the whole matrix at once
        _, ids = scores.topk(k, dim=-1)
        with torch.enable_grad():  # a graph from the codes to the output, for the backward
            out = F.embedding(ids, codebook).sum(dim=-2) / k
        ctx.save_for_backward(x, codebook, out)
        ctx.mark_non_differentiable(ids)
        return out.detach().clone(), ids

    @staticmethod
    def backward(ctx, grad_out, grad_ids):
        x, codebook, out = ctx.saved_tensors
        with torch.enable_grad():
            mse = ((out - x) ** 2).sum(dim=-1).mean()
            grad_mse = torch.autograd.grad(mse, codebook, retain_graph=True)[0]
        grad_codes = torch.autograd.grad(out, codebook, grad_out)[0] + grad_mse
        return grad_out, grad_codes, None  # straight-through to the input


class Reference(nn.Module):
    """Official-style grouped codebook: one LayerNorm + codebook per head, run in a Python loop.
    Built from a CodebookLayer, with copies of its parameters, so the two can be compared."""

    def __init__(self, layer):
        super().__init__()
        G, C, d = layer.codebook.shape
        self.k, self.d = layer.k, d
        self.lns = nn.ModuleList(nn.LayerNorm(d, eps=1e-5) for _ in range(G))
        self.codebooks = nn.ParameterList(nn.Parameter(layer.codebook[h].detach().clone()) for h in range(G))
        with torch.no_grad():
            for h, ln in enumerate(self.lns):
                ln.weight.copy_(layer.ln_weight[h])
                ln.bias.copy_(layer.ln_bias[h])

    def forward(self, x):
        """x (N, G*d) -> out (N, G*d), ids (N, G, k)."""
        outs, ids = [], []
        for h, (ln, codebook) in enumerate(zip(self.lns, self.codebooks)):
            out, i = RefSnap.apply(ln(x[:, h * self.d:(h + 1) * self.d]), codebook, self.k)
            outs.append(out)
            ids.append(i)
        return torch.cat(outs, dim=-1), torch.stack(ids, dim=1)


# -----------------------------------------------------------------------------
# the rows, each run in a process of its own (run_row)


def score_matmuls(N, G, d, C, device):
    """The bare score matmul of a site, the irreducible work of its search: fn(out) runs, per group,
    (N, d) @ (d, C) into out (N, C), the codes already normalised and laid out (d, C)."""
    xs = [torch.randn(N, d, device=device) for _ in range(G)]
    codes = [F.normalize(torch.randn(C, d, device=device), dim=-1).T.contiguous() for _ in range(G)]

    def fn(out):
        for h in range(G):
            torch.mm(xs[h], codes[h], out=out)
    return fn


def layer_row(cfg, shape, variant, device):
    N, G, d, C, k = SHAPES[shape]
    torch.manual_seed(0)
    if variant == "matmul":
        matmul, buf = score_matmuls(N, G, d, C, device), torch.empty(N, C, device=device)

        def fwd(out=None):
            matmul(torch.empty(N, C, device=device) if out is None else out)

        fwd(buf)
        mem = peak_mb(fwd, device)
        reps = max(1, min(cfg.reps, int(cfg.budget / max(timed(lambda: fwd(buf), device), 1e-9))))
        return dict(fwd_ms=1e3 * min(timed(lambda: fwd(buf), device) for _ in range(reps)),
                    peak_mb=mem, reps=reps)
    layer = CodebookLayer(G * d, C, k, G, compile=variant == "compiled").to(device)
    if variant in ("layer", "compiled"):  # plain: codebook.py's own search; reference: its own loop
        use_tuned_search(layer)
    model = Reference(layer).to(device) if variant == "reference" else layer
    x = torch.randn(N, G * d, device=device, requires_grad=True)
    grad = torch.randn(N, G * d, device=device)
    params = list(model.parameters())

    def clear():
        x.grad = None
        for p in params:
            p.grad = None

    def fwd():
        clear()
        model(x)

    def fwd_bwd():
        clear()
        model(x)[0].backward(grad)

    t_warm = timed(fwd_bwd, device)  # compiles, for "compiled"
    clear()  # the gradients this call makes are part of its peak
    t0 = time.perf_counter()
    mem = peak_mb(fwd_bwd, device)
    reps = max(1, min(cfg.reps, int(cfg.budget / (time.perf_counter() - t0))))
    out = dict(fwd_ms=1e3 * min(timed(fwd, device) for _ in range(reps)),
               fwdbwd_ms=1e3 * min(timed(fwd_bwd, device) for _ in range(reps)),
               peak_mb=mem, reps=reps)
    if variant == "compiled":
        out["warmup_s"] = t_warm  # includes compilation
    if variant in ("layer", "compiled"):
        p = tiled.plan_for(x.device)
        fused = p["fused"] if p["fused"] and triton_kernels.available(x.device, x.shape[-1]) else None
        out["fused"] = fused
        if fused:
            with torch.no_grad():
                u = triton_kernels.unit(layer.codebook)
                _, proven = triton_kernels.candidates(layer.normalize(x), u, k, fused, p["block"], p["fused_tile"],
                                                     p["tile_elems"])
            out["unproven"] = 1 - proven.float().mean().item()
    return out


def train_row(cfg, device):
    """Both models in one process, their steps alternating, so that a change in the machine's load
    hits both alike."""
    tc = dict(TRAIN, **(QUICK_TRAIN if cfg.quick else {}))
    fsm = FSM(tc["num_states"], tc["num_edges"], seed=tc["fsm_seed"])
    models = {}
    for cb_at in ("none", tc["cb_at"]):
        torch.manual_seed(tc["seed"])
        model = use_tuned_search(GPT(GPTConfig(block_size=tc["block_size"], vocab_size=fsm.vocab_size,
                                               n_layer=tc["n_layer"], n_head=tc["n_head"], n_embd=tc["n_embd"],
                                               cb_at=cb_at, num_codes=tc["num_codes"], k=tc["k"]))).to(device)
        # train.py's groups: weight decay on the weights of Linears and embeddings only, never on codes,
        # LayerNorms (the codebooks' (G, d) ones included) or biases
        weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        decay = [p for n, p in model.named_parameters() if n in weights]
        rest = [p for n, p in model.named_parameters() if n not in weights]
        groups = [dict(params=decay, weight_decay=tc["weight_decay"]), dict(params=rest, weight_decay=0.0)]
        optimizer = torch.optim.AdamW(groups, lr=tc["learning_rate"], betas=(tc["beta1"], tc["beta2"]),
                                      fused=device == "cuda")
        models[cb_at] = (model, optimizer, torch.Generator().manual_seed(tc["seed"]))

    def step(model, optimizer, seq):
        _, loss, _, _ = model(seq[:, :-1], seq[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        optimizer.step()

    tokens = tc["batch_size"] * (tc["block_size"] - 1)
    # the model's codebook layers alone (copies: forward + backward), their searches alone, on inputs
    # (tokens, G, d) as the layers give them, and the searches' bare score matmuls as the matmul rows: the
    # floor of any search that scores every code
    layers = [copy.deepcopy(layer) for layer in models[tc["cb_at"]][0].codebooks().values()]
    sites = [(layer.groups, layer.dim // layer.groups, layer.num_codes) for layer in layers]
    inputs = [torch.randn(tokens, layer.dim, device=device, requires_grad=True) for layer in layers]
    grads = [torch.randn(tokens, layer.dim, device=device) for layer in layers]
    bare = [(score_matmuls(tokens, G, d, C, device), torch.empty(tokens, C, device=device)) for G, d, C in sites]

    def matmuls():
        for matmul, out in bare:
            matmul(out)

    def searches():
        for layer, x in zip(layers, inputs):
            tiled.search(x.detach().view(tokens, layer.groups, -1), layer.codebook.detach(), layer.k)

    def codebook_layers():
        for layer, x, grad in zip(layers, inputs, grads):
            x.grad = layer.codebook.grad = layer.ln_weight.grad = layer.ln_bias.grad = None
            layer(x)[0].backward(grad)

    extra = dict(matmul=matmuls, search=searches, layers=codebook_layers)
    times = {cb_at: [] for cb_at in (*models, *extra)}
    for i in range(2 + cfg.train_steps):
        for cb_at, (model, optimizer, gen) in models.items():
            seq = fsm.sample(tc["batch_size"], tc["block_size"], gen).to(device)
            t = timed(lambda: step(model, optimizer, seq), device)
            if i >= 2:
                times[cb_at].append(t)
        for name, fn in extra.items():
            t = timed(fn, device)
            if i >= 2:
                times[name].append(t)
    out = {name: dict(us_per_token=1e6 * min(times[key]) / tokens, sites=len(sites))
           for name, key in (("codebook_layers", "layers"), ("searches", "search"), ("score_matmuls", "matmul"))}
    for cb_at in models:
        out["plain" if cb_at == "none" else "codebook"] = dict(
            us_per_token=1e6 * min(times[cb_at]) / tokens, steps=len(times[cb_at]), tokens_per_step=tokens,
            config={k: (cb_at if k == "cb_at" else tc[k]) for k in (
                "n_layer", "n_head", "n_embd", "batch_size", "block_size", "cb_at", "num_codes", "k")})
    return out


def run_row(cfg):
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plan = tiled.PLANS["cpu" if device == "cpu" else "cuda"]
    for key in ("tile_elems", "block_k1", "k1_blocks", "block"):  # --tile_elems=... etc.: try another plan
        if getattr(cfg, key):
            plan[key] = getattr(cfg, key)
    if cfg.fused:
        plan["fused"] = None if cfg.fused == "none" else cfg.fused
    if cfg.fused_tile:
        plan["fused_tile"] = tuple(int(v) for v in cfg.fused_tile.split(","))
    what, _, arg = cfg.row.partition(":")
    out = train_row(cfg, device) if what == "train" else layer_row(cfg, what, arg, device)
    print_row(out)


# -----------------------------------------------------------------------------
# the table


def main(cfg):
    device = pick_device(cfg.device)
    threads = cfg.threads or torch.get_num_threads()
    dev_name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    wait = os.environ.get("OMP_WAIT_POLICY", cfg.omp_wait) or "default"
    print(f"device {device} ({dev_name}), {threads} threads (OMP_WAIT_POLICY {wait}), torch {torch.__version__}")
    result = dict(device=device, device_name=dev_name, threads=threads, omp_wait_policy=wait, torch=torch.__version__,
                  config=dataclasses.asdict(cfg), load_before=os.getloadavg(), shapes={})
    variants = [v for v in VARIANTS if cfg.compile or v != "compiled"]
    print(f"{'shape':6} {'N':>6} {'G x d':>8} {'C':>7} {'k':>2}  {'row':10} {'fwd ms':>9} {'fwd+bwd ms':>11} "
          f"{'peak MB':>8} {'speedup':>8} {'vs matmul':>9} {'memory':>7}")
    for name in shape_names(cfg):
        N, G, d, C, k = SHAPES[name]
        rows = {v: spawn("benchmarks.search", cfg, f"{name}:{v}") for v in variants}
        ref, mm = rows.get("reference") or {}, rows.get("matmul") or {}
        entry = dict(N=N, G=G, d=d, C=C, k=k, rows=rows, ratios={})
        for v in variants:
            r = rows[v] or {}
            total = r.get("fwdbwd_ms")
            ratios = dict(speedup_vs_reference=ratio(ref.get("fwdbwd_ms"), total),
                          vs_matmul=ratio(total, mm.get("fwd_ms")),
                          memory_vs_reference=ratio(r.get("peak_mb"), ref.get("peak_mb")))
            if v in ("layer", "compiled"):
                entry["ratios"].update({(k_ if v == "layer" else f"compiled_{k_}"): val for k_, val in ratios.items()})
            if v == "plain":  # what the tuned search (use_tuned_search) gains over codebook.py's plain one
                entry["ratios"]["plain_vs_layer"] = ratio(total, (rows.get("layer") or {}).get("fwdbwd_ms"))
            head = f"{name:6} {N:6d} {f'{G} x {d}':>8} {C:7d} {k:2d}" if v == variants[0] else " " * 33
            print(f"{head}  {v:10} {fmt(r.get('fwd_ms'), '9.1f')} {fmt(total, '11.1f')} {fmt(r.get('peak_mb'), '8.1f')} "
                  f"{fmt(ratios['speedup_vs_reference'], '7.2f', 'x')} {fmt(ratios['vs_matmul'], '8.2f', 'x')} "
                  f"{fmt(ratios['memory_vs_reference'], '6.2f', 'x')}", flush=True)
        fused = (rows.get("layer") or {}).get("fused")
        if fused:
            print(" " * 35 + f"layer: the fused Triton search in {fused}; its proof left "
                  f"{rows['layer']['unproven']:.3%} of (token, group) rows to the exact kernel", flush=True)
        if device == "cuda" and "layer" in rows:
            met = {key: (v is not None and (v >= goal if key.startswith("speedup") else v <= goal))
                   for key, goal in GOALS.items() for v in [entry["ratios"].get(key)]}
            entry["goals_met"] = met
            print(" " * 35 + "goals (speedup >= 3x, vs matmul <= 2x, memory <= 0.5x): " +
                  ", ".join(f"{key} {'met' if ok else 'MISSED'}" for key, ok in met.items()), flush=True)
        result["shapes"][name] = entry
    trained = spawn("benchmarks.search", cfg, "train") or {}
    plain, coded = trained.get("plain"), trained.get("codebook")
    overhead = ratio((coded or {}).get("us_per_token"), (plain or {}).get("us_per_token"))
    parts = {key: (trained.get(key) or {}).get("us_per_token") for key in ("codebook_layers", "searches", "score_matmuls")}
    result["train"] = dict(plain=plain, codebook=coded, **{key: trained.get(key) for key in parts})
    result["train_overhead"] = overhead
    floor = None
    if plain and None not in parts.values():  # the layers as they are, but a search that costs only its matmuls
        floor = 1 + (parts["codebook_layers"] - parts["searches"] + parts["score_matmuls"]) / plain["us_per_token"]
    result["train_overhead_floor"] = floor
    if coded:
        c = coded["config"]
        print(f"training, the default fsm preset ({c['n_layer']} layers, {c['n_head']} heads, n_embd {c['n_embd']}, batch "
              f"{c['batch_size']} x {c['block_size']}, {c['cb_at']} codebooks, C={c['num_codes']}, k={c['k']}): "
              f"plain {fmt((plain or {}).get('us_per_token'), '.2f')} us/token, with codebooks "
              f"{coded['us_per_token']:.2f} us/token, train_overhead {fmt(overhead, '.2f')}x")
        print(f"  the {trained['searches']['sites']} codebook layers alone (forward + backward) "
              f"{fmt(parts['codebook_layers'], '.2f')} us/token, their searches {fmt(parts['searches'], '.2f')}, the "
              f"searches' score matmuls ((tokens, d) @ (d, C), fp32) {fmt(parts['score_matmuls'], '.2f')}: with a "
              f"search that costs only its matmuls, train_overhead {fmt(floor, '.2f')}x")
    result["load_after"] = os.getloadavg()
    print("speedup: reference fwd+bwd / row fwd+bwd; vs matmul: row fwd+bwd / bare matmul fwd; "
          "memory: row peak / reference peak")
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f} "
          "(this run adds about 1-2; more means other work shared the cores)".format(*result["load_before"], *result["load_after"]))
    return write_result(cfg.out, result)


if __name__ == "__main__":
    config = parse(sys.argv[1:])
    if config.row:
        run_row(config)
    else:
        main(config)
