"""
Train a transformer with codebooks. The default is the TokFSM experiment, sized for a 2-core CPU:

    python train.py                                 # --config=fsm: attn+MLP codebooks, k=1
    python train.py --cb_at=none --out_dir=out-fsm-none
    python train.py --config=fsm_paper              # the paper's run (batch 512, C=10k, 20k steps): a GPU
    python train.py --max_iters=4000 --resume=True  # continue out_dir/ckpt.pt up to 4000 steps

On several GPUs or machines (more in distributed.py), or a big batch in steps on a small one; batch_size
is the global batch, split over processes and accumulation steps:

    torchrun --standalone --nproc_per_node=8 train.py --config=fsm_paper   # 8 GPUs (nccl; CPUs: gloo)
    python train.py --config=fsm_paper --gradient_accumulation_steps=8     # the paper's batch on one GPU

Language models on token data prepared by tinystories_data.py (train.bin / val.bin / meta.json); the
synthetic stories on a CPU: a baseline, then the paper's finetuning with and without attention codebooks:

    python train.py --config=stories --cb_at=none --out_dir=out-stories-none     # data_dir=data/stories
    python train.py --config=stories_ft --init_from=out-stories-none/ckpt.pt       # k-means-initialised codes
    python train.py --config=stories_ft --init_from=out-stories-none/ckpt.pt --cb_at=none --out_dir=out-stories-ft-none
    python train.py --config=stories                # or: codebooks inserted half-way through one run
    python train.py --config=tinystories --data_dir=data/tinystories              # the real data: a GPU

Overrides are --key=value (no exec); unknown keys and bad values stop with a one-line error.
Writes out_dir/ckpt.pt (atomically, loadable with torch.load(weights_only=True)) and out_dir/metrics.json.
"""

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import tinystories_data
import distributed
from common import Progress, fail, load_checkpoint, model_from_checkpoint, parse_args, save_checkpoint
from fsm_data import FSM
from model import CB_AT, GPT, GPTConfig


@dataclass
class TrainConfig:
    out_dir: str = "out-fsm"  # where ckpt.pt and metrics.json go
    data_dir: str = ""  # token data from tinystories_data.py ("": the finite state machine below)
    init_from: str = ""  # a checkpoint without codebooks to finetune with codebooks inserted (token data)
    # data: the finite state machine
    fsm_seed: int = 42  # seed of the FSM's construction (42: the paper's FSM)
    num_states: int = 100
    num_edges: int = 10  # out-edges per state, equally likely
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128  # tokens per sequence (FSM: BOS + 63 states + 1 digit: 127 predictions)
    cb_at: str = "attn+mlp"  # codebook sites: none, attn, mlp, attn+mlp
    num_codes: int = 1024  # codes per codebook (per head at attention)
    k: int = 1  # codes per token per group
    cb_layers: str = "all"  # layers with codebooks: "all" or e.g. "0,2"
    cb_warmup: int = 600  # train this many steps without codebooks, then insert them (k-means init)
    replace_every: int = 50  # reset codes unused for this many steps (0: off, as in the paper)
    replace_rho: float = 0.01  # noise scale of reset codes, relative to the input's norm
    # optimisation
    batch_size: int = 64  # sequences per update, over all processes and accumulation steps
    gradient_accumulation_steps: int = 1  # forward/backward passes per update and process (as nanoGPT)
    max_iters: int = 1500
    learning_rate: float = 5e-3
    cb_lr: float = 0.0  # learning rate of the codes (0: same as learning_rate)
    weight_decay: float = 0.1  # never applied to codes, LayerNorms, biases
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    warmup_iters: int = 20
    decay_lr: bool = True  # cosine decay to min_lr at max_iters (False: constant, as the paper)
    min_lr: float = 5e-4
    # evaluation and logging
    eval_interval: int = 250
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
    "fsm": {},  # the defaults above: a 2-core CPU in about 10 minutes
    "fsm_paper": dict(out_dir="out-fsm-paper", batch_size=512, max_iters=20000, num_codes=10000,
                      learning_rate=1e-3, decay_lr=False, warmup_iters=0, cb_warmup=0, replace_every=0,
                      eval_interval=2000, eval_seqs=2048, compile=True),
    # a 2-core CPU in a few minutes on the synthetic stories (tinystories_data.py --synthetic)
    "stories": dict(out_dir="out-stories", data_dir="data/stories", n_layer=2, n_head=4, n_embd=128,
                    block_size=256, cb_at="attn", num_codes=512, k=8, cb_warmup=250, batch_size=16, max_iters=500,
                    learning_rate=3e-3, min_lr=3e-4, eval_interval=100, eval_seqs=128, log_interval=10),
    # the paper's protocol: finetune a trained model (--init_from=CKPT) with codebooks inserted, or without
    # them (--cb_at=none: the baseline to compare with), at a lower learning rate
    "stories_ft": dict(out_dir="out-stories-ft", data_dir="data/stories", n_layer=2, n_head=4, n_embd=128,
                       block_size=256, cb_at="attn", num_codes=512, k=8, batch_size=16, max_iters=200,
                       learning_rate=1e-3, min_lr=1e-4, warmup_iters=0, eval_interval=50, eval_seqs=128,
                       log_interval=10),
    # the real TinyStories on a GPU (gpt2 tokens): the paper's width, k=8 attention codebooks inserted
    # half-way (standing in for its finetuning), C=10k, lr 5e-4, block 512
    "tinystories": dict(out_dir="out-tinystories", data_dir="data/tinystories", n_layer=2, n_head=16, n_embd=1024,
                        block_size=512, cb_at="attn", num_codes=10000, k=8, cb_warmup=10000, replace_every=0,
                        batch_size=32, max_iters=20000, learning_rate=5e-4, min_lr=5e-5, warmup_iters=200,
                        eval_interval=1000, eval_seqs=512, compile=True, dtype="bfloat16"),
}

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "cb_at", "num_codes", "k", "cb_layers")


# -----------------------------------------------------------------------------
# configuration: parsed by common.parse_args, checked here


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
    if cfg.device not in ("auto", "cpu", "cuda", "mps"):
        fail(f"--device={cfg.device}: valid: auto, cpu, cuda, mps")
    if cfg.dtype not in ("float32", "bfloat16"):
        fail(f"--dtype={cfg.dtype}: valid: float32, bfloat16")
    layers(cfg)
    if cfg.block_size < 2:
        fail(f"--block_size={cfg.block_size}: must be >= 2")


def layers(cfg):
    if cfg.cb_layers == "all":
        return None
    try:
        out = tuple(int(x) for x in cfg.cb_layers.split(","))
    except ValueError:
        fail(f"--cb_layers={cfg.cb_layers}: expected 'all' or layer numbers like 0,2")
    if any(not 0 <= i < cfg.n_layer for i in out):
        fail(f"--cb_layers={cfg.cb_layers}: layers must be in 0..{cfg.n_layer - 1}")
    return out


def build_model(cfg, vocab_size, cb_at=None):
    return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, cb_at=cb_at or cfg.cb_at,
                         num_codes=cfg.num_codes, k=cfg.k, cb_layers=layers(cfg), compile=cfg.compile))


def insert_codebooks(model, cfg, vocab_size, idx):
    """A copy of a trained model with codebooks added, k-means-initialised from its activations on idx."""
    new = build_model(cfg, vocab_size).to(idx.device)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".codebook." in k for k in missing), (missing, unexpected)
    new.init_codebooks(idx)
    return new


def insert_once(model, cfg, vocab_size, draw, world):
    """insert_codebooks with the k-means run once: on rank 0, from a global batch of its data (draw() gives
    one micro-batch). The other ranks build the same model; wrapping it in DDP copies rank 0's weights and
    codes to them."""
    if not world.master:
        return build_model(cfg, vocab_size).to(world.device)
    idx = torch.cat([draw() for _ in range(world.size * cfg.gradient_accumulation_steps)])
    return insert_codebooks(model, cfg, vocab_size, idx[:, :-1].to(world.device))


# -----------------------------------------------------------------------------
# finetuning a trained model


def load_base(cfg, given):
    """The checkpoint that --init_from names, checked: no codebooks yet, the same kind of data.
    With --cb_at=none it is finetuned as it is: the baseline to compare a finetune with codebooks with."""
    try:
        base = load_checkpoint(cfg.init_from)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--init_from: {e}")
    if base["model_args"]["cb_at"] != "none":
        fail(f"--init_from inserts codebooks into a model without them: {cfg.init_from} has cb_at="
             f"{base['model_args']['cb_at']}")
    if base.get("kind") != ("lm" if cfg.data_dir else "fsm"):
        fail(f"--init_from={cfg.init_from} was trained on kind={base.get('kind')!r} data")
    shape = ("n_layer", "n_head", "n_embd", "block_size")
    changed = [k for k in shape if k in given and getattr(cfg, k) != base["config"][k]]
    if changed:
        fail(f"--init_from: {', '.join(changed)} differ from the checkpoint's (its shape is kept)")
    return base


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, val, batch_size, device):
    """Mean loss and next-token accuracy over all predicted positions of val (S, L)."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for seq in val.split(batch_size):
        seq = seq.to(device)
        logits, loss, _, _ = model(seq[:, :-1], seq[:, 1:])
        loss_sum += loss.item() * seq[:, 1:].numel()
        correct += (logits.argmax(-1) == seq[:, 1:]).sum().item()
        n += seq[:, 1:].numel()
    model.train()
    return loss_sum / n, correct / n


@torch.no_grad()
def fsm_state_accuracy(model, fsm, n_seqs, block_size, device, seed=0):
    """Sample n_seqs sequences from BOS at temperature 1; fraction of state transitions that are edges."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.full((n_seqs, 1), fsm.bos, dtype=torch.long, device=device)
    out = model.generate(idx, block_size - 1, temperature=1.0, generator=gen)
    model.train()
    return fsm.state_accuracy(out.cpu())


# -----------------------------------------------------------------------------
# training


def lr_at(it, cfg):
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg, device):
    codes = [p for n, p in model.named_parameters() if n.endswith(".codebook")]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith(".codebook")]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay, lr_mult=1.0),
              dict(params=rest, weight_decay=0.0, lr_mult=1.0)]
    if codes:  # no weight decay on codes, as in the paper's runs
        groups.append(dict(params=codes, weight_decay=0.0, lr_mult=(cfg.cb_lr or cfg.learning_rate) / cfg.learning_rate))
    fused = device.startswith("cuda")  # "cuda:1" under torchrun
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def train_step(model, optimizer, batches, grad_clip, amp=nullcontext()):
    """One update from this process's micro-batches (B, T + 1): their gradients summed, each loss divided
    by their number, so that 2 x B gives the update of 1 x 2B; under DDP averaged over the processes once,
    in the last backward (no_sync before). Returns the mean loss and codebook MSE (tensors: no host sync)."""
    n, raw = len(batches), model.module if isinstance(model, DDP) else model
    for cb in raw.codebooks().values():  # the codes' reconstruction gradient is added inside their
        cb.mse_weight = 1.0 / n  # backward, not through the loss: divide it by n too
    optimizer.zero_grad(set_to_none=True)
    losses, mses = [], []
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
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    if cfg.resume:
        try:
            ckpt = load_checkpoint(ckpt_path)
        except (FileNotFoundError, ValueError) as e:
            fail(f"cannot resume: {e}")
        stored = ckpt["config"]
        changed = [k for k in MODEL_KEYS if k in given and getattr(cfg, k) != stored[k]]
        if changed:
            fail(f"cannot resume with a different model: {', '.join(changed)} differ from the checkpoint")
        cfg = TrainConfig(**{**stored, **{k: getattr(cfg, k) for k in given}})
        check(cfg)
    base = None
    if cfg.init_from and ckpt is None:  # finetune a trained model with codebooks: its shape, our codebooks
        base = load_base(cfg, given)
        cfg = dataclasses.replace(cfg, **{k: base["config"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")})
    world = distributed.from_env(cfg.device)  # torchrun's processes, or rank 0 of 1
    device = world.device
    micro = distributed.micro_batch(cfg.batch_size, cfg.gradient_accumulation_steps, world, ckpt is not None)
    distributed.init(world)
    log = print if world.master else lambda *a: None  # rank 0 speaks for all
    cuda = device.startswith("cuda")  # "cuda:1" under torchrun
    # bf16 autocast, as nanoGPT: the transformer's matmuls on a GPU's tensor cores
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
    torch.manual_seed(cfg.seed)
    fsm, meta = None, None
    if cfg.data_dir:  # token data: windows of block_size + 1 tokens, all predicted
        try:
            train_data, val_data, meta = tinystories_data.load_tokens(cfg.data_dir)
            val = tinystories_data.fixed_windows(val_data, cfg.eval_seqs, cfg.block_size + 1)
        except (OSError, ValueError) as e:
            fail(f"--data_dir={cfg.data_dir}: {e}")
        vocab_size = meta["vocab_size"]

        def sample(gen):  # on a GPU through pinned memory, copied while the last step still runs (nanoGPT)
            batch = tinystories_data.get_batch(train_data, micro, cfg.block_size + 1, gen)
            return batch.pin_memory().to(device, non_blocking=True) if cuda else batch.to(device)
    else:
        fsm = FSM(cfg.num_states, cfg.num_edges, seed=cfg.fsm_seed)
        vocab_size = fsm.vocab_size
        val = fsm.sample(cfg.eval_seqs, cfg.block_size, torch.Generator().manual_seed(cfg.seed + 1))

        def sample(gen):  # made where gen lives: on a GPU, no host work and no copy
            return fsm.sample(micro, cfg.block_size, gen).to(device)
    # a stream per rank; the FSM's walks are drawn on the GPU when training on one, token windows on the host
    data_gen = torch.Generator(device=device if fsm and cuda else "cpu")
    data_gen.manual_seed(distributed.data_seed(cfg.seed, world.rank))
    if ckpt is not None:  # the stored model: with or without its codebooks yet
        model = GPT(GPTConfig(**ckpt["model_args"])).to(device)
    elif base is not None:
        if base["model_args"]["vocab_size"] != vocab_size:
            fail(f"--init_from={cfg.init_from}: its vocab {base['model_args']['vocab_size']} is not the data's "
                 f"{vocab_size}")
        model = model_from_checkpoint(base, device)
        if cfg.cb_at != "none":
            model = insert_once(model, cfg, vocab_size, lambda: sample(data_gen), world)
            log(f"inserted codebooks ({', '.join(model.codebooks())}) into {cfg.init_from}, k-means initialised")
    else:
        model = build_model(cfg, vocab_size, "none" if cfg.cb_warmup else None).to(device)
    optimizer = make_optimizer(model, cfg, device)
    it, wall_before = 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        saved = ckpt.get("data_rngs", [ckpt["data_rng"]])  # one per process of the stored run
        torch.set_rng_state(ckpt["torch_rng"])
        it, wall_before = ckpt["iter_num"], ckpt["wall_s"]
        try:
            if world.rank < len(saved):  # a rank the stored run did not have starts its own stream
                data_gen.set_state(saved[world.rank])
        except RuntimeError:  # a generator of another device kind (a GPU run resumed on a CPU, or back)
            data_gen.manual_seed(distributed.data_seed(cfg.seed + it, world.rank))
            log("the checkpoint's data streams were drawn on another device: the data differ from an unbroken run")
        log(f"resumed from {ckpt_path} at step {it}" + ("" if len(saved) == world.size else
            f"; it ran on {len(saved)} process(es), this on {world.size}: the data differ from an unbroken run"))
    ddp_model = distributed.wrap(model, world)
    bayes_loss, bayes_acc = fsm.bayes(cfg.block_size) if fsm else (0.0, 0.0)
    log(json.dumps(dataclasses.asdict(cfg)))
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}, " +
        (f"{world.size} processes, " if world.ddp else "") +
        (f"Bayes-optimal loss {bayes_loss:.4f} acc {bayes_acc:.4f}" if fsm else
         f"vocab {vocab_size}, {len(train_data)} train / {len(val_data)} val tokens"))
    data = (dict(kind="fsm", fsm=dict(num_states=cfg.num_states, num_edges=cfg.num_edges, seed=cfg.fsm_seed)) if fsm
            else dict(kind="lm", data=dict(data_dir=os.path.abspath(cfg.data_dir), meta=meta)))

    def checkpoint(data_rngs):  # on rank 0, with every rank's data generator
        save_checkpoint(ckpt_path, dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(), iter_num=it,
            config=dataclasses.asdict(cfg), model_args=dataclasses.asdict(model.config), data_rng=data_rngs[0],
            data_rngs=data_rngs, world_size=world.size, torch_rng=torch.get_rng_state(),
            wall_s=wall_before + time.time() - t0, **data))

    t0 = t_log = time.time()
    start_it = it_log = it
    step_ms = None  # ms per training step over the last log interval
    bar = Progress(cfg.max_iters, "train", initial=it, quiet=not world.master)
    while it < cfg.max_iters:
        if it >= cfg.cb_warmup and cfg.cb_at != "none" and not model.codebooks():
            model = insert_once(model, cfg, vocab_size, lambda: sample(data_gen), world)
            ddp_model, optimizer = distributed.wrap(model, world), make_optimizer(model, cfg, device)
            bar.write(f"step {it}: inserted codebooks ({', '.join(model.codebooks())}), k-means initialised")
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        batches = [sample(data_gen) for _ in range(cfg.gradient_accumulation_steps)]
        loss, mse = train_step(ddp_model, optimizer, batches, cfg.grad_clip, amp)
        it += 1
        if cfg.replace_every and it % cfg.replace_every == 0 and it < cfg.max_iters and model.codebooks():
            distributed.reduce_usage(model, world)  # dead: fired on no rank; replaced once, then broadcast
            cbs = model.codebooks().values() if world.master else ()
            n = sum(cb.replace_dead_codes(cfg.replace_rho) for cb in cbs)
            distributed.broadcast([cb.codebook for cb in model.codebooks().values()], world)
            bar.write(f"step {it}: replaced {n} dead codes")
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
            distributed.reduce_usage(model, world)  # stats and the checkpoint's firings: all ranks'
            data_rngs = distributed.gather(data_gen.get_state(), world)
            if world.master:
                with amp:
                    vl, va = evaluate(model, val, micro, device)
                usage = model.codebook_stats()
                alive = f" alive {usage['all']['alive']:.3f} mse {usage['all']['mse']:.3f}" if usage else ""
                bayes = f" (Bayes +{vl - bayes_loss:.4f})" if fsm else ""
                bar.write(f"step {it}: val loss {vl:.4f}{bayes} acc {va:.4f}{alive}")
                checkpoint(data_rngs)
            t_log, it_log = time.time(), it  # step times leave evaluation out
    bar.close()
    wall = time.time() - t0
    del ddp_model  # before distributed.cleanup
    if it == start_it:  # nothing to train (resumed at max_iters): still report
        distributed.reduce_usage(model, world)
        usage = model.codebook_stats()
    if not world.master:  # rank 0 evaluates, samples and writes for all; the others wait in cleanup
        distributed.cleanup(world)
        return None
    with amp:
        vl, va = evaluate(model, val, micro, device)
        sacc = fsm_state_accuracy(model, fsm, cfg.state_seqs, cfg.block_size, device, seed=cfg.seed) if fsm else None
    metrics = dict(val_loss=vl, val_acc=va)
    if fsm:
        metrics.update(state_acc=sacc, bayes_loss=bayes_loss, bayes_acc=bayes_acc)
    predicted = cfg.block_size - 1 if fsm else cfg.block_size  # predictions per sequence
    metrics.update(alive={n: s["alive"] for n, s in usage.items()}, mse=usage.get("all", {}).get("mse"),
                   iters=it, wall_s=wall_before + wall, step_ms=step_ms,
                   tokens_per_s=(it - start_it) * cfg.batch_size * predicted / max(wall, 1e-9),
                   device=device, world_size=world.size, config=dataclasses.asdict(cfg))
    with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if fsm:
        print(f"val loss {vl:.4f} (Bayes {bayes_loss:.4f}, +{vl - bayes_loss:.4f}), acc {va:.4f}, "
              f"state acc {sacc:.4f}; wrote {cfg.out_dir}/metrics.json")
    else:
        print(f"val loss {vl:.4f}, acc {va:.4f}, {wall_before + wall:.0f} s; wrote {cfg.out_dir}/metrics.json")
    distributed.cleanup(world)
    return metrics


if __name__ == "__main__":
    config, given_keys = parse_args(sys.argv[1:], TrainConfig, PRESETS)
    check(config)
    train(config, given_keys)
    distributed.exit_process()
