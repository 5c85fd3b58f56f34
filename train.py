"""
Train a transformer with codebooks. The default is the TokFSM experiment, sized for a 2-core CPU:

    python train.py                                 # --config=fsm: 2 layers, attn+MLP codebooks, k=1 (5 min)
    python train.py --config=fsm_full               # the paper's 4 layers (12 min on 2 CPU cores)
    python train.py --cb_at=none --out_dir=out-fsm-none
    python train.py --config=fsm_paper              # the paper's run (batch 512, C=10k, 20k steps): a GPU
    python train.py --max_iters=4000 --resume=True  # continue out_dir/ckpt.pt up to 4000 steps

On several GPUs or machines (more in helpers/distributed.py), or a big batch in steps on a small one; batch_size
is the global batch, split over processes and accumulation steps:

    torchrun --standalone --nproc_per_node=8 train.py --config=fsm_paper   # 8 GPUs (nccl; CPUs: gloo)
    python train.py --config=fsm_paper --gradient_accumulation_steps=8     # the paper's batch on one GPU

Language models on token data prepared by tinystories_data.py (train.bin / val.bin / meta.json); the
synthetic stories on a CPU: a baseline, then the paper's finetuning with and without attention codebooks:

    python train.py --config=stories --cb_at=none --out_dir=out-stories-none     # data_dir=data/stories
    python train.py --config=stories_ft --init_from=out-stories-none/ckpt.pt       # k-means-initialised codes
    python train.py --config=stories_ft --init_from=out-stories-none/ckpt.pt --cb_at=none --out_dir=out-stories-ft-none
    python train.py --config=stories                # or: codebooks inserted half-way through one run

A pretrained model from the Hugging Face hub (GPT-Neo, GPT-2, Pythia), finetuned with codebooks inserted or without
them; the tinystories preset is the paper's (TinyStories-1Layer-21M, attention codebooks k=8, C=10k), a GPU job:

    python train.py --config=tinystories                                           # data_dir=data/tinystories
    python train.py --config=tinystories --cb_at=none --out_dir=out-tinystories-none   # the baseline
    python train.py --init_from=gpt2 --data_dir=D --cb_at=attn --k=8                  # or owner/name[@rev], a dir
    python train.py --config=wikitext       # the paper's Pythia-410M on WikiText-103, data_dir=data/wikitext

Overrides are --key=value (no exec); unknown flags and bad values stop with a one-line error.
Writes out_dir/ckpt.pt (loadable with torch.load(weights_only=True)) and out_dir/metrics.json, both atomically.
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import distributed
from helpers.checkpoints import check_encoding, load_base, load_optimizer_state, resume, write_checkpoint
from helpers.evaluation import evaluate, report
from helpers.common import Progress, fail, load_checkpoint, parse_args
from helpers.train_data import load_data
from model import CB_AT, GPT, GPTConfig, model_from_checkpoint
from tuned import use_tuned_search


@dataclass
class TrainConfig:
    out_dir: str = "out-fsm"  # where ckpt.pt and metrics.json go
    data_dir: str = ""  # token data from tinystories_data.py ("": the finite state machine below)
    init_from: str = ""  # finetune (token data): a checkpoint without codebooks, or a pretrained model (a hub
    #   id owner/name[@revision], gpt2..gpt2-xl, or a directory holding config.json and its weights)
    # data: the finite state machine
    fsm_seed: int = 42  # seed of the FSM's construction (42: the paper's FSM)
    num_states: int = 100
    num_edges: int = 10  # out-edges per state, equally likely
    # model
    n_layer: int = 2  # the paper's TokFSM model has 4 (--config=fsm_full): 2 train in a third of the time
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128  # tokens per sequence (FSM: BOS + 63 states + 1 digit: 127 predictions)
    cb_at: str = "attn+mlp"  # codebook sites: none, attn, mlp, attn+mlp
    num_codes: int = 1024  # codes per codebook (per head at attention)
    k: int = 1  # codes per token per group
    cb_layers: str = "all"  # layers with codebooks: "all" or e.g. "0,2"
    cb_warmup: int = 300  # train this many steps without codebooks, then insert them (k-means init)
    replace_every: int = 5  # reset codes unused for this many steps (0: off, as in the paper): often, since
    #   most k = 1 codes stop firing in the first hundred steps after insertion (results/README.md, section 1)
    replace_rho: float = 0.01  # noise scale of reset codes, relative to the input's norm
    # optimisation
    batch_size: int = 64  # sequences per update, over all processes and accumulation steps
    gradient_accumulation_steps: int = 1  # forward/backward passes per update and process (as nanoGPT)
    max_iters: int = 960
    learning_rate: float = 5e-3
    cb_lr: float = 0.0  # learning rate of the codes (0: same as learning_rate)
    weight_decay: float = 0.1  # never applied to codes, LayerNorms, biases
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    warmup_iters: int = 20
    decay_lr: bool = True  # decay to min_lr at max_iters (False: constant, as the paper's TokFSM runs)
    lr_decay: str = "cosine"  # the decay's shape: cosine, or linear (TinyStories' model card)
    min_lr: float = 5e-4
    # evaluation and logging
    eval_interval: int = 240
    eval_seqs: int = 512  # held-out sequences (token data: windows of val.bin) for val_loss / val_acc
    state_seqs: int = 200  # sequences sampled from BOS for state accuracy
    log_interval: int = 50
    # system
    device: str = "auto"  # auto, cpu, cuda, mps
    compile: bool = False  # torch.compile the codebook search
    dtype: str = "float32"  # or bfloat16: the transformer's matmuls under bf16 autocast (codebooks stay fp32)
    seed: int = 1337
    resume: bool = False  # continue from out_dir/ckpt.pt


PRESETS = {
    "fsm": {},  # the defaults above: about 5 minutes on a 2-core CPU
    "fsm_paper": dict(out_dir="out-fsm-paper", n_layer=4, batch_size=512, max_iters=20000, num_codes=10000,
                      learning_rate=1e-3, decay_lr=False, warmup_iters=0, cb_warmup=0, replace_every=0,
                      eval_interval=2000, eval_seqs=2048, compile=True),
    # the paper's TokFSM model (4 layers) at 1% of its tokens: the recipe before the default above, 12 minutes
    "fsm_full": dict(out_dir="out-fsm-full", n_layer=4, cb_warmup=600, max_iters=1500, replace_every=50,
                     eval_interval=250),
    # a 2-core CPU in a few minutes on the synthetic stories (tinystories_data.py --synthetic)
    "stories": dict(out_dir="out-stories", data_dir="data/stories", n_layer=2, n_head=4, n_embd=128,
                    block_size=256, cb_at="attn", num_codes=512, k=8, cb_warmup=250, replace_every=50, batch_size=16,
                    max_iters=500, learning_rate=3e-3, min_lr=3e-4, eval_interval=100, eval_seqs=128, log_interval=10),
    # the paper's protocol: finetune a trained model (--init_from=CKPT) with codebooks inserted, or without
    # them (--cb_at=none: the baseline to compare with), at a lower learning rate
    "stories_ft": dict(out_dir="out-stories-ft", data_dir="data/stories", n_layer=2, n_head=4, n_embd=128,
                       block_size=256, cb_at="attn", num_codes=512, k=8, replace_every=50, batch_size=16, max_iters=200,
                       learning_rate=1e-3, min_lr=1e-4, warmup_iters=0, eval_interval=50, eval_seqs=128,
                       log_interval=10),
    # real text on a 2-core CPU (tinystories_data.py --input=FILE --encoding=words --passage_words=150): a
    # model trained without codebooks (10 min), then its finetune with attention codebooks (text_ft, 5 min).
    # Twice the stories' depth and width: at 2 layers x 128 the model's loss on real prose stays near 3.6
    # nats/token and no code steers it (README: "Topic steering on real text")
    "text": dict(out_dir="out-text", data_dir="data/text", n_layer=4, n_head=8, n_embd=256, block_size=256,
                 cb_at="none", batch_size=16, max_iters=650, learning_rate=2e-3, min_lr=2e-4, warmup_iters=50,
                 eval_interval=130, eval_seqs=128, log_interval=10),
    "text_ft": dict(out_dir="out-text-ft", data_dir="data/text", n_layer=4, n_head=8, n_embd=256, block_size=256,
                    cb_at="attn", num_codes=512, k=8, replace_every=50, batch_size=16, max_iters=200,
                    learning_rate=1e-3, min_lr=1e-4, warmup_iters=0, eval_interval=50, eval_seqs=128,
                    log_interval=10),
    # the paper's Table 2a on one GPU: TinyStories-1Layer-21M (GPT-Neo, d 1024, 16 heads, gpt2 tokens)
    # finetuned with per-head attention codebooks, k=8, C=10k, lr 5e-4, batch 96 x 512 (--cb_at=none: the
    # baseline). The model card's 100k steps, linear, 5% warm-up, shortened to 10k (README: what each costs)
    "tinystories": dict(out_dir="out-tinystories", data_dir="data/tinystories",
                        init_from="roneneldan/TinyStories-1Layer-21M", block_size=512, cb_at="attn",
                        num_codes=10000, k=8, cb_warmup=0, replace_every=0, batch_size=96, max_iters=10000,
                        learning_rate=5e-4, lr_decay="linear", min_lr=0.0, warmup_iters=500, eval_interval=1000,
                        eval_seqs=512, compile=True, dtype="bfloat16"),
    # the paper's Table 2b on one GPU: Pythia-410M (GPT-NeoX, 24 layers, d 1024, 16 heads, its own tokenizer)
    # finetuned on WikiText-103 with attention codebooks on all 24 layers, k=8, C=10k; the official main.yaml's
    # lr 5e-4 constant, no warm-up, 15,000 steps of 24 x 1024 tokens (docs/language_models.md: the data)
    "wikitext": dict(out_dir="out-wikitext", data_dir="data/wikitext", init_from="EleutherAI/pythia-410m-deduped",
                     block_size=1024, cb_at="attn", num_codes=10000, k=8, cb_warmup=0, replace_every=0,
                     batch_size=24, max_iters=15000, learning_rate=5e-4, decay_lr=False, warmup_iters=0,
                     eval_interval=500, eval_seqs=512, compile=True, dtype="bfloat16"),
    # from scratch: 2 layers at the paper's width, k=8 attention codebooks inserted half-way, C=10k
    "tinystories_scratch": dict(out_dir="out-tinystories-scratch", data_dir="data/tinystories", n_layer=2, n_head=16, n_embd=1024,
                        block_size=512, cb_at="attn", num_codes=10000, k=8, cb_warmup=10000, replace_every=0,
                        batch_size=32, max_iters=20000, learning_rate=5e-4, min_lr=5e-5, warmup_iters=200,
                        eval_interval=1000, eval_seqs=512, compile=True, dtype="bfloat16"),
}

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "cb_at", "num_codes", "k", "cb_layers")


# -----------------------------------------------------------------------------
# configuration: parsed by helpers.common.parse_args, checked here, completed from a checkpoint


def check(cfg):
    """Stop on values that cannot work, naming the key and what is valid."""
    if cfg.cb_at not in CB_AT:
        fail(f"--cb_at={cfg.cb_at}: valid: {', '.join(CB_AT)}")
    for key in ("n_layer", "n_head", "n_embd", "num_codes", "k", "batch_size", "num_states", "num_edges",
                "eval_seqs", "state_seqs", "log_interval", "eval_interval", "gradient_accumulation_steps"):
        if getattr(cfg, key) < 1:
            fail(f"--{key}={getattr(cfg, key)}: must be >= 1")
    for key in ("max_iters", "replace_every", "warmup_iters", "cb_warmup"):
        if getattr(cfg, key) < 0:
            fail(f"--{key}={getattr(cfg, key)}: must be >= 0")
    if cfg.k > cfg.num_codes:
        fail(f"--k={cfg.k}: must be <= num_codes={cfg.num_codes}")
    if cfg.n_embd % cfg.n_head:
        fail(f"--n_embd={cfg.n_embd}: must be divisible by n_head={cfg.n_head}")
    if cfg.num_edges > cfg.num_states:
        fail(f"--num_edges={cfg.num_edges}: must be <= num_states={cfg.num_states}")
    if cfg.learning_rate <= 0 or cfg.cb_lr < 0:
        fail("--learning_rate must be > 0 and --cb_lr >= 0")
    if cfg.lr_decay not in ("cosine", "linear"):
        fail(f"--lr_decay={cfg.lr_decay}: valid: cosine, linear")
    if cfg.device not in ("auto", "cpu", "cuda", "mps"):
        fail(f"--device={cfg.device}: valid: auto, cpu, cuda, mps")
    if cfg.dtype not in ("float32", "bfloat16"):
        fail(f"--dtype={cfg.dtype}: valid: float32, bfloat16")
    codebook_layers(cfg)
    if cfg.block_size < 2:
        fail(f"--block_size={cfg.block_size}: must be >= 2")


def codebook_layers(cfg):
    """--cb_layers as GPTConfig.cb_layers: None (all layers) or a tuple of layer numbers."""
    if cfg.cb_layers == "all":
        return None
    try:
        out = tuple(int(x) for x in cfg.cb_layers.split(","))
    except ValueError:
        fail(f"--cb_layers={cfg.cb_layers}: expected 'all' or layer numbers like 0,2")
    if any(not 0 <= i < cfg.n_layer for i in out):
        fail(f"--cb_layers={cfg.cb_layers}: layers must be in 0..{cfg.n_layer - 1}")
    return out


def resolve_config(cfg, given):
    """The run's config -> (cfg, the checkpoint to resume or None, the base checkpoint to finetune or None).
    --resume: the stored run's config, with the keys given now on top (its model's shape cannot change);
    --init_from: the base model's shape, our codebooks."""
    if cfg.resume:
        try:
            ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
        except (FileNotFoundError, ValueError) as e:
            fail(f"cannot resume: {e}")
        stored = ckpt["config"]
        changed = [k for k in MODEL_KEYS if k in given and getattr(cfg, k) != stored[k]]
        if changed:
            fail(f"cannot resume with a different model: {', '.join(changed)} differ from the checkpoint")
        # out_dir: where the run was found, also where a copied checkpoint is resumed from
        cfg = TrainConfig(**{**stored, **{k: getattr(cfg, k) for k in given}, "out_dir": cfg.out_dir})
        check(cfg)
        return cfg, ckpt, None
    if cfg.init_from:
        base = load_base(cfg, given)
        shape = {k: base["config"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
        return dataclasses.replace(cfg, **shape), None, base
    return cfg, None, None


# -----------------------------------------------------------------------------
# the model and its optimizer: new, resumed, or a trained model with codebooks inserted


def build_model(cfg, vocab_size=None, like=None, cb_at=None):
    """A new GPT with cfg's codebooks (cb_at: other sites, e.g. "none" until cb_warmup) and the tuned
    search: of cfg's shape and vocab_size, or of the architecture of the model `like` (a pretrained one's
    attention and GELU included)."""
    codebooks = dict(cb_at=cb_at or cfg.cb_at, num_codes=cfg.num_codes, k=cfg.k, cb_layers=codebook_layers(cfg),
                     compile=cfg.compile)
    config = dataclasses.replace(like.config, **codebooks) if like is not None else GPTConfig(
        block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
        **codebooks)
    return use_tuned_search(GPT(config))


def insert_codebooks(model, cfg, draw, world):
    """A copy of a trained model with cfg's codebooks added, k-means-initialised once: on rank 0, from a
    global batch of its data (draw() gives one micro-batch). The other ranks build the same model; wrapping
    it in DDP copies rank 0's weights and codes to them."""
    new = build_model(cfg, like=model).to(world.device)
    if world.master:
        missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all(".codebook." in k for k in missing), (missing, unexpected)
        idx = torch.cat([draw() for _ in range(world.size * cfg.gradient_accumulation_steps)])
        new.init_codebooks(idx[:, :-1].to(world.device))
    return new


def make_optimizer(model, cfg, device):
    """AdamW, weight decay on the weights of the Linears and embeddings only. Chosen by name, not by shape:
    a codebook's LayerNorm affine (ln_weight, ln_bias) is (G, d) but gets no decay, as LayerNorms and biases."""
    weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    params = list(model.named_parameters())  # a tied weight once
    codes = [p for n, p in params if n.endswith(".codebook")]
    decay = [p for n, p in params if n in weights]
    rest = [p for n, p in params if n not in weights and not n.endswith(".codebook")]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay, lr_mult=1.0),
              dict(params=rest, weight_decay=0.0, lr_mult=1.0)]
    if codes:  # no weight decay on codes, as in the paper's runs
        lr_mult = (cfg.cb_lr or cfg.learning_rate) / cfg.learning_rate
        groups.append(dict(params=codes, weight_decay=0.0, lr_mult=lr_mult))
    fused = device.startswith("cuda")  # "cuda:1" under torchrun
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def init_model(cfg, ckpt, base, data, world, log):
    """-> (model, optimizer): the stored ones (with or without codebooks yet), a base model with codebooks
    inserted (--init_from), or a new model, without codebooks until cb_warmup."""
    if ckpt is not None:
        model = use_tuned_search(GPT(GPTConfig(**ckpt["model_args"]))).to(world.device)
    elif base is not None:
        if data.fsm is None:
            check_encoding(base, data, cfg.init_from)
        elif base["model_args"]["vocab_size"] != data.vocab_size:
            fail(f"--init_from={cfg.init_from}: its vocab {base['model_args']['vocab_size']} is not the data's "
                 f"{data.vocab_size}")
        model = use_tuned_search(model_from_checkpoint(base, world.device))
        if cfg.cb_at != "none":
            model = insert_codebooks(model, cfg, data.sample, world)
            log(f"inserted codebooks ({', '.join(model.codebooks())}) into {cfg.init_from}, k-means initialised")
    else:
        model = build_model(cfg, data.vocab_size, cb_at="none" if cfg.cb_warmup else None).to(world.device)
    optimizer = make_optimizer(model, cfg, world.device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, model, ckpt["optimizer"])
    return model, optimizer


def insert_codebooks_mid_run(model, optimizer, cfg, data, world):
    """Codebooks inserted into the running model at cb_warmup -> (model, its DDP wrapper, optimizer), the
    weights' Adam state kept."""
    new = insert_codebooks(model, cfg, data.sample, world)
    ddp_model, new_optimizer = distributed.wrap(new, world), make_optimizer(new, cfg, world.device)
    # the weights keep their Adam moments and step (a fresh Adam at near-peak lr takes sign-sized steps);
    # equal on every rank, as the old optimizer was; the codes start without state
    state = {name: optimizer.state[p] for name, p in model.named_parameters() if p in optimizer.state}
    for name, p in new.named_parameters():
        if name in state:
            new_optimizer.state[p] = state[name]
    return new, ddp_model, new_optimizer


def replace_dead_codes(model, rho, world):
    """Reset the codes that fired on no rank since the last reset: once, on rank 0, then broadcast."""
    distributed.reduce_usage(model, world)
    n = sum(cb.replace_dead_codes(rho) for cb in model.codebooks().values()) if world.master else 0
    distributed.broadcast([cb.codebook for cb in model.codebooks().values()], world)
    return n


# -----------------------------------------------------------------------------
# training


def lr_at(it, cfg):
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    shape = 1.0 - ratio if cfg.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + shape * (cfg.learning_rate - cfg.min_lr)


@contextmanager
def mse_weights_divided(model, n):
    """Each codebook's mse_weight divided by n, then restored: the codes' reconstruction gradient is added
    inside their backward, not through the loss, so dividing the loss by n does not reach it."""
    cbs = list(model.codebooks().values())
    weights = [cb.mse_weight for cb in cbs]
    for cb, w in zip(cbs, weights):
        cb.mse_weight = w / n
    try:
        yield
    finally:
        for cb, w in zip(cbs, weights):
            cb.mse_weight = w


def train_step(model, optimizer, batches, grad_clip, amp=nullcontext()):
    """One update from this process's micro-batches (B, T + 1): their gradients summed, each loss divided
    by their number, so that 2 x B gives the update of 1 x 2B; under DDP averaged over the processes once,
    in the last backward (no_sync before). Returns the mean loss and codebook MSE (tensors: no host sync)."""
    n, raw = len(batches), model.module if isinstance(model, DDP) else model
    optimizer.zero_grad(set_to_none=True)
    losses, mses = [], []
    with mse_weights_divided(raw, n):
        for i, seq in enumerate(batches):
            with model.no_sync() if isinstance(model, DDP) and i < n - 1 else nullcontext():
                with amp:  # bf16 autocast for the forward (--dtype=bfloat16), or nothing
                    _, loss, _, mse = model(seq[:, :-1], seq[:, 1:])
                (loss / n).backward()
            losses.append(loss.detach())
            mses.append(mse)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return sum(losses) / n, None if mses[0] is None else sum(mses) / n


def train(cfg, given=()):
    os.makedirs(cfg.out_dir, exist_ok=True)
    cfg, ckpt, base = resolve_config(cfg, given)
    world = distributed.from_env(cfg.device)  # torchrun's processes, or rank 0 of 1
    micro = distributed.micro_batch(cfg.batch_size, cfg.gradient_accumulation_steps, world, ckpt is not None)
    distributed.init(world)
    device, log = world.device, print if world.master else lambda *a: None  # rank 0 speaks for all
    # bf16 autocast, as nanoGPT: the transformer's matmuls on a GPU's tensor cores
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
    torch.manual_seed(cfg.seed)
    data = load_data(cfg, micro, world)
    model, optimizer = init_model(cfg, ckpt, base, data, world, log)
    it, wall_before = resume(ckpt, cfg, data, world, log) if ckpt is not None else (0, 0.0)
    ddp_model = distributed.wrap(model, world)  # the model itself in a plain run
    log(json.dumps(dataclasses.asdict(cfg)))
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}, " +
        (f"{world.size} processes, " if world.ddp else "") + data.summary)

    t0 = t_log = time.time()
    start_it = it_log = it
    step_ms = None  # ms per training step over the last log interval
    replaced, replaced_since = 0, it  # dead codes replaced since the last line that said how many
    final = None  # (val loss, acc) at max_iters, for the report
    bar = Progress(cfg.max_iters, "train", initial=it, quiet=not world.master)
    while it < cfg.max_iters:
        if it >= cfg.cb_warmup and cfg.cb_at != "none" and not model.codebooks():  # codebooks: insert them
            model, ddp_model, optimizer = insert_codebooks_mid_run(model, optimizer, cfg, data, world)
            bar.write(f"step {it}: inserted codebooks ({', '.join(model.codebooks())}), k-means initialised")
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        batches = [data.sample() for _ in range(cfg.gradient_accumulation_steps)]
        loss, mse = train_step(ddp_model, optimizer, batches, cfg.grad_clip, amp)
        it += 1
        if cfg.replace_every and it % cfg.replace_every == 0 and it < cfg.max_iters and model.codebooks():
            replaced += replace_dead_codes(model, cfg.replace_rho, world)  # codebooks: reset the dead codes
            if it % max(cfg.log_interval, cfg.replace_every) < cfg.replace_every:  # a line a log interval at most
                bar.write(f"step {it}: replaced {replaced} dead codes since step {replaced_since}")
                replaced, replaced_since = 0, it
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            loss, mse = distributed.mean([loss, mse], world)
            loss_now = loss.item()  # waits for the GPU, so the interval below is the steps' real time
            now = time.time()
            step_ms = 1e3 * (now - t_log) / max(1, it - it_log)
            bar.set_postfix(loss=f"{loss_now:.4f}", mse=f"{mse.item():.2f}" if mse is not None else "-",
                            ms_per_step=f"{step_ms:.0f}")
            t_log, it_log = now, it
        bar.update(1)
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            distributed.reduce_usage(model, world)  # codebooks: usage over all ranks, for the log and checkpoint
            data_rngs = distributed.gather(data.gen.get_state(), world)
            if world.master:
                with amp:
                    vl, va = evaluate(model, data.val, micro, device)
                usage = model.codebook_stats()  # alive, mse since the last evaluation
                alive = f" alive {usage['all']['alive']:.3f} mse {usage['all']['mse']:.3f}" if usage else ""
                bayes = f" (Bayes +{vl - data.bayes[0]:.4f})" if data.fsm else ""
                bar.write(f"step {it}: val loss {vl:.4f}{bayes} acc {va:.4f}{alive}")
                final = (vl, va) if it == cfg.max_iters else None
                write_checkpoint(cfg, model, optimizer, it, wall_before + time.time() - t0, data, data_rngs, world)
            t_log, it_log = time.time(), it  # step times leave evaluation out
    bar.close()
    wall = time.time() - t0
    del ddp_model  # before distributed.cleanup
    if it == start_it:  # nothing to train (resumed at max_iters): still report
        distributed.reduce_usage(model, world)
        usage = model.codebook_stats()
    metrics = None
    if world.master:  # rank 0 evaluates, samples and writes for all; the others wait in cleanup
        predicted = cfg.block_size - 1 if data.fsm else cfg.block_size  # predictions per sequence
        run = dict(iters=it, wall_s=wall_before + wall, step_ms=step_ms,
                   tokens_per_s=(it - start_it) * cfg.batch_size * predicted / max(wall, 1e-9),
                   device=device, world_size=world.size)
        metrics = report(model, cfg, data, usage, run, amp, micro, device, final)
    distributed.cleanup(world)
    return metrics


if __name__ == "__main__":
    config, given_keys = parse_args(sys.argv[1:], TrainConfig, PRESETS)
    check(config)
    train(config, given_keys)
    distributed.exit_process()
