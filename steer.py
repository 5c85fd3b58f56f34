"""
Read and control a trained codebook model: which codes stand for which FSM states (codes vs neurons),
what patching them does, and sampling with codes forced or ablated. One command each:

    python steer.py states --ckpt=out-fsm/ckpt.pt     # codes vs neurons as classifiers of the state
    python steer.py patch --ckpt=out-fsm/ckpt.pt      # patch the codes of state s with those of t
    python steer.py usage --ckpt=out-fsm/ckpt.pt      # alive codes, usage entropy, histogram
    python steer.py show L2.mlp:88 --ckpt=out-fsm/ckpt.pt       # top contexts of one code
    python steer.py search '\\|3' --ckpt=out-fsm/ckpt.pt         # codes that fire where a regex matches
    python steer.py generate --ckpt=out-fsm/ckpt.pt --prompt=3712 --force=L3.mlp:5 --at=new

Flags are --key=value; `python steer.py COMMAND --help` lists a command's flags and defaults. Each
command writes COMMAND.json next to the checkpoint. Errors are one line on stderr, exit status 2.
FSM tokens are shown as digits with BOS as '|' (the text `search` matches against: "|371245...").

Definitions (SPEC section 2). A pattern is a set M of positions in the sampled sequences:
  state s:        the last digit of state s (there "the current state is s");
  state+digit s,d: the first digit of the state after s, when that digit is d.
  A code fires where its codebook selects it (any of the k slots). recall = |M and fired| / |M|,
  precision = |M and fired| / |fired|, counted over every position of every sequence (BOS included).
  Best code of a pattern: the highest F1 = 2 P R / (P + R) among all codes of the site (all heads).
  Neurons of the same layer: for L{i}.mlp the GELU units (L{i}.mlp.hidden), the MLP output before its
  codebook (L{i}.mlp.in) and the residual after the block (L{i}.resid); for L{i}.attn the merged head
  outputs before the codebook (L{i}.attn.in). A neuron is thresholded at its n-th largest activation on
  M, n = ceil(r |M|) with r the best code's recall, and fires where its activation >= the threshold
  (recall >= r, exactly r without ties); both signs are tried (-a is a neuron too). The best neuron
  is the one with the highest precision. `states` reports the site whose best codes have the highest
  mean F1 over the state patterns.
  patch: for each trial an input ending in s (last token = last digit of s) and one ending in t, both
  BOS + ctx_states states. The codes of the t-input's last position are forced at the s-input's last
  position (every group, every slot), and the patched next-token distribution is compared with the
  model's own on the t-input: mean JSD / mean JSD with no patch. force_success: with all MLP codes
  patched, the greedy next state (argmax digit by digit, the patch kept at its position) is a
  successor of t; force_success_excl also requires it not to be a successor of s; force_baseline is
  force_success with no patch.
"""

import json
import math
import os
import re
import string
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import train
from codebook import Intervention
from fsm_data import FSM
from model import format_code, parse_code

FLAGS = dict(  # every flag and its default; the type of the default is the type of the flag
    ckpt="",  # a checkpoint written by train.py (required)
    device="cpu",  # cpu, cuda, mps or auto
    seed=0,  # seed of the sampled sequences, the trials and the samples
    n_seqs=500,  # sequences sampled by states, usage, show and search
    batch_size=100,  # sequences per forward pass
    min_count=5,  # states: patterns with fewer positions are left out of the means
    pairs=500,  # patch: random (s, t) trials
    ctx_states=8,  # patch: states per input (after BOS)
    top=10,  # show, search: rows printed
    context=24,  # show: tokens of context before the firing token
    prompt="",  # generate: the prompt, digits (BOS is prepended)
    force="",  # generate: codes forced, e.g. L3.mlp:5,L1.attn.h2:40
    ablate="",  # generate: codes ablated
    at="all",  # generate: where forced/ablated: all, prompt, new, or positions like 3,4,5
    n=4,  # generate: samples
    max_new_tokens=32,  # generate
    temperature=1.0,  # generate
    top_k=0,  # generate: 0 = no top-k cut
)
COMMON = ("ckpt", "device", "seed", "batch_size")
COMMANDS = dict(  # command: (positional argument or None, its flags)
    states=(None, COMMON + ("n_seqs", "min_count")),
    patch=(None, COMMON + ("pairs", "ctx_states")),
    usage=(None, COMMON + ("n_seqs",)),
    show=("CODE", COMMON + ("n_seqs", "top", "context")),
    search=("REGEX", COMMON + ("n_seqs", "top")),
    generate=(None, COMMON + ("prompt", "force", "ablate", "at", "n", "max_new_tokens", "temperature", "top_k")),
)


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    """['show', 'L2.mlp:88', '--ckpt=x.pt'] -> (command, positional argument or None, flags dict)."""
    if not argv or argv[0] not in COMMANDS:
        fail(f"usage: python steer.py COMMAND [ARG] --ckpt=PATH [--key=value ...]; commands: {', '.join(COMMANDS)}")
    cmd, rest = argv[0], argv[1:]
    pos_name, allowed = COMMANDS[cmd]
    if "--help" in rest or "-h" in rest:
        print(f"python steer.py {cmd}{' ' + pos_name if pos_name else ''} " + " ".join(f"--{k}={FLAGS[k]!r}" for k in allowed))
        sys.exit(0)
    cfg, positional = {k: FLAGS[k] for k in allowed}, []
    for arg in rest:
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        if "=" not in arg:
            fail(f"bad argument {arg!r}: expected --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in allowed:
            fail(f"unknown flag --{key} for {cmd}; valid: {', '.join(allowed)}")
        try:
            cfg[key] = type(FLAGS[key])(text)
        except ValueError:
            fail(f"--{key}={text}: expected {type(FLAGS[key]).__name__}")
    if len(positional) != (1 if pos_name else 0):
        fail(f"{cmd} takes {'one argument, ' + pos_name if pos_name else 'no argument'}; got {positional or 'none'}")
    if not cfg["ckpt"]:
        fail("--ckpt=PATH is required")
    for key in ("n_seqs", "batch_size", "pairs", "ctx_states", "top", "n", "max_new_tokens"):
        if key in cfg and cfg[key] < 1:
            fail(f"--{key}={cfg[key]}: must be >= 1")
    if cfg["device"] not in ("cpu", "cuda", "mps", "auto") or cfg.get("temperature", 1.0) <= 0:
        fail(f"--device={cfg['device']} must be cpu, cuda, mps or auto, and --temperature > 0")
    return cmd, (positional or [None])[0], cfg


# -----------------------------------------------------------------------------
# checkpoints and tokens: the only place that knows what kind of data a checkpoint was trained on


def load(cfg):
    try:
        ckpt = train.load_checkpoint(cfg["ckpt"])
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        fail(f"{cfg['ckpt']} is not a checkpoint written by train.py")
    try:
        model = train.model_from_checkpoint(ckpt, train.pick_device(cfg["device"])).eval()
    except (KeyError, TypeError, RuntimeError) as e:
        fail(f"{cfg['ckpt']}: the weights do not fit its model_args ({type(e).__name__})")
    if not model.codebooks():
        fail(f"{cfg['ckpt']} has no codebooks (cb_at=none): nothing to read or steer")
    return ckpt, model


def need_fsm(ckpt, cmd):
    if ckpt.get("kind") != "fsm":
        fail(f"{cmd} needs an FSM checkpoint; this one has kind={ckpt.get('kind')!r}")
    f = ckpt["fsm"]
    return FSM(f["num_states"], f["num_edges"], base=f.get("base", 10), seed=f["seed"])


def tokenizer(ckpt):
    """(encode, decode, render) for a checkpoint: encode(text) -> ids, BOS first; decode(ids) -> one string
    per token; render(ids, pos0, mark) -> readable text of a window that starts at position pos0, the token
    at position mark in [brackets]. Only FSM checkpoints for now: a language-model kind adds its branch here."""
    fsm = need_fsm(ckpt, "decoding tokens")
    alphabet = (string.digits + string.ascii_lowercase)[:fsm.base]

    def encode(text):
        bad = [c for c in text if c not in alphabet]
        if bad:
            fail(f"prompt {text!r}: FSM prompts are digits in {alphabet!r}, got {bad[0]!r}")
        return [fsm.bos] + [alphabet.index(c) for c in text]

    def decode(ids):
        return ["|" if i == fsm.bos else alphabet[i] for i in ids]

    def render(ids, pos0=0, mark=None):  # a space before each state's first digit
        return "".join((" " if p > 0 and (p - 1) % fsm.digits == 0 else "") + (f"[{s}]" if p == mark else s)
                       for p, s in enumerate(decode(ids), pos0))
    return encode, decode, render


def write_json(cfg, name, obj):
    path = os.path.join(os.path.dirname(os.path.abspath(cfg["ckpt"])), name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")


def parse_codes(model, text, ablate=False, positions=None):
    """'L3.mlp:5,L1.attn.h2:40' -> [Intervention], checked against the model."""
    out = []
    for a in filter(None, (s.strip() for s in text.split(","))):
        try:
            site, group, code = parse_code(a)
            iv = Intervention(site, group, code, ablate, positions)
            model.check_intervention(iv)
        except ValueError as e:
            fail(str(e))
        out.append(iv)
    return out


# -----------------------------------------------------------------------------
# the math: pure functions of tensors


def pair_counts(ids, labels, num_labels, num_codes):
    """ids (P, n) codes firing at P positions (ids >= 0, unique per row), labels (P,) pattern id or -1 ->
    for every (pattern, code) pair that fires together: lab (U,), code (U,), tp (U,) = |M and fired|;
    fired (num_codes,) = firings of each code; size (num_labels,) = |M| of each pattern."""
    fired = torch.bincount(ids.reshape(-1), minlength=num_codes)
    m = labels >= 0
    size = torch.bincount(labels[m], minlength=num_labels)
    keys = (labels[m, None] * num_codes + ids[m]).reshape(-1)  # one key per (pattern, code) co-firing
    uniq, tp = torch.unique(keys, return_counts=True)
    return uniq // num_codes, uniq % num_codes, tp, fired, size


def best_codes(ids, labels, num_labels, num_codes):
    """The highest-F1 code of every pattern: code, precision, recall, each (num_labels,); -1 / 0 where
    a pattern never occurs."""
    lab, code, tp, fired, size = pair_counts(ids, labels, num_labels, num_codes)
    prec, rec = tp / fired[code].double(), tp / size[lab].double()  # double: recall * |M| must give back tp
    f1 = 2 * prec * rec / (prec + rec)
    order = torch.sort(lab * 2.0 + f1, stable=True).indices  # by pattern, then by F1 (F1 <= 1 < 2)
    last = torch.searchsorted(lab[order], torch.arange(num_labels), right=True) - 1  # best of each pattern
    ok = size > 0
    pick = order[last.clamp_min(0)]
    z = torch.zeros(num_labels, dtype=torch.double)
    return torch.where(ok, code[pick], -1), torch.where(ok, prec[pick], z), torch.where(ok, rec[pick], z)


def neuron_precision(acts, sorted_all, labels, recall):
    """Neurons thresholded at a pattern's recall. acts (P, H) activations at all positions, sorted_all
    (H, P) the same sorted ascending per unit, labels (P,) pattern id or -1, recall (S,) target recall of
    each pattern -> precision (S, H), recall (S, H) for the sign +a, and the same two for -a.
    Unit h on pattern s fires where a >= its n-th largest value on M_s, n = ceil(recall_s |M_s|)."""
    S, (P, H) = len(recall), acts.shape
    m = labels >= 0
    lab = labels[m]
    perm = torch.argsort(lab, stable=True)
    a = acts[m][perm].T.contiguous()  # (H, Q): the positions of each pattern contiguous
    size = torch.bincount(lab, minlength=S)
    start = (size.cumsum(0) - size).tolist()
    n = (recall.double() * size - 1e-6).ceil().long().clamp(min=1).minimum(size.clamp_min(1))  # (S,)
    thr = torch.zeros(2, S, H, dtype=acts.dtype)  # thresholds of +a (a >= thr) and of -a (a <= thr)
    tp = torch.zeros(2, S, H, dtype=torch.long)
    for s in size.nonzero().squeeze(1).tolist():  # a loop over patterns, vectorised over units
        seg = a[:, start[s]:start[s] + size[s]].sort(dim=1).values  # (H, |M_s|) ascending
        ns = int(n[s])
        thr[0, s], thr[1, s] = seg[:, -ns], seg[:, ns - 1]  # the n-th largest; the n-th smallest (-a's n-th largest)
        tp[0, s] = size[s] - torch.searchsorted(seg, thr[0, s, :, None]).squeeze(1)  # ties count as hits
        tp[1, s] = torch.searchsorted(seg, thr[1, s, :, None], right=True).squeeze(1)
    fired_pos = P - torch.searchsorted(sorted_all, thr[0].T.contiguous())  # (H, S): a >= thr
    fired_neg = torch.searchsorted(sorted_all, thr[1].T.contiguous(), right=True)  # (H, S): a <= thr
    rec = tp / size.clamp_min(1)[None, :, None]
    return tp[0] / fired_pos.T.clamp_min(1), rec[0], tp[1] / fired_neg.T.clamp_min(1), rec[1]


def jsd(p, q):
    """Jensen-Shannon divergence in nats of distributions along the last dim: (..., V), (..., V) -> (...)."""
    m = 0.5 * (p + q)
    return 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)


# -----------------------------------------------------------------------------
# running the model


@torch.no_grad()
def run(model, tokens, batch_size, keep=(), desc="forward"):
    """tokens (B, T) -> codes {site: (B, T, G, k)}, the cached activations named in keep {name: (B*T, H)},
    and the logits (B, T, V)."""
    dev = next(model.parameters()).device
    codes, acts, logits = {}, {k: [] for k in keep}, []
    for x in tqdm(tokens.split(batch_size), desc=desc, disable=None, leave=False):
        cache = {}
        lg, _, c, _ = model(x.to(dev), cache=cache)
        for s, v in c.items():
            codes.setdefault(s, []).append(v.cpu())
        for k in keep:
            acts[k].append(cache[k].reshape(-1, cache[k].shape[-1]).float().cpu())
        logits.append(lg.cpu())
    return ({s: torch.cat(v) for s, v in codes.items()}, {k: torch.cat(v) for k, v in acts.items()}, torch.cat(logits))


def flat_ids(codes, num_codes):
    """(B, T, G, k) ids -> (B*T, G*k) ids unique across groups (group g's code c is g*C + c)."""
    B, T, G, k = codes.shape
    return (codes + torch.arange(G)[:, None] * num_codes).reshape(B * T, G * k)


def code_name(site, flat, num_codes):
    return format_code(site, int(flat) // num_codes, int(flat) % num_codes)


def neuron_sources(site):
    layer, kind = site.split(".")
    return [f"{site}.in"] if kind == "attn" else [f"{site}.hidden", f"{site}.in", f"{layer}.resid"]


def sample_fsm(fsm, cfg, block_size):
    return fsm.sample(cfg["n_seqs"], block_size, torch.Generator().manual_seed(cfg["seed"]))


# -----------------------------------------------------------------------------
# commands


def cmd_states(cfg, ckpt, model):
    fsm = need_fsm(ckpt, "states")
    t0 = time.time()
    tokens = sample_fsm(fsm, cfg, model.config.block_size)  # (B, L)
    state, digit = fsm.state_labels(tokens)  # (B, L) each
    prev = torch.cat([torch.full_like(state[:, :1], -1), state[:, :-1]], 1)  # state of the position before
    D, N = fsm.digits, fsm.num_states
    families = dict(  # pattern id per position, -1 outside every pattern
        state=torch.where((digit == D - 1) & (state >= 0), state, -1).reshape(-1),
        state_digit=torch.where((digit == 0) & (prev >= 0), prev * fsm.base + tokens, -1).reshape(-1))
    num = dict(state=N, state_digit=N * fsm.base)
    cbs = model.codebooks()
    keep = sorted({k for s in cbs for k in neuron_sources(s)})
    codes, acts, _ = run(model, tokens, cfg["batch_size"], keep)
    sites, table = {}, {}
    for site in tqdm(cbs, desc="sites", disable=None, leave=False):
        C = cbs[site].num_codes
        ids = flat_ids(codes[site], C)
        sorted_all = {k: acts[k].T.contiguous().sort(dim=1).values for k in neuron_sources(site)}
        res = {}
        for fam, labels in families.items():
            code, prec, rec = best_codes(ids, labels, num[fam], cbs[site].groups * C)
            size = torch.bincount(labels[labels >= 0], minlength=num[fam])
            best = torch.full((num[fam],), -1.0)
            who = [""] * num[fam]
            for src in neuron_sources(site):  # best neuron of each pattern over sources, units and signs
                pp, _, pn, _ = neuron_precision(acts[src], sorted_all[src], labels, rec)
                for sign, p in (("+", pp), ("-", pn)):
                    v, h = p.max(1)
                    for s in (v > best).nonzero().squeeze(1).tolist():
                        who[s] = f"{sign}{src}[{h[s]}]"
                    best = torch.maximum(best, v)
            keep_s = size >= cfg["min_count"]
            f1 = 2 * prec * rec / (prec + rec).clamp_min(1e-12)
            res[fam] = dict(patterns=int(keep_s.sum()), code_precision=prec[keep_s].mean().item(),
                            code_recall=rec[keep_s].mean().item(), code_f1=f1[keep_s].mean().item(),
                            neuron_precision=best[keep_s].mean().item())
            if fam == "state":
                table[site] = [dict(state=s, count=int(size[s]), code=code_name(site, code[s], C),
                                    precision=round(prec[s].item(), 4), recall=round(rec[s].item(), 4),
                                    neuron=who[s], neuron_precision=round(best[s].item(), 4))
                               for s in range(N) if keep_s[s]]
        sites[site] = res
    print(f"{'site':10s} | {'state: code prec':>16s} {'recall':>6s} {'neuron prec':>11s} | "
          f"{'state+digit: code prec':>22s} {'recall':>6s} {'neuron prec':>11s}")
    for site, r in sites.items():
        a, b = r["state"], r["state_digit"]
        print(f"{site:10s} | {a['code_precision']:16.3f} {a['code_recall']:6.3f} {a['neuron_precision']:11.3f} | "
              f"{b['code_precision']:22.3f} {b['code_recall']:6.3f} {b['neuron_precision']:11.3f}")
    top = max(sites, key=lambda s: sites[s]["state"]["code_f1"])
    r = sites[top]["state"]
    print(f"best site {top}: state codes precision {r['code_precision']:.3f} (recall {r['code_recall']:.3f}) vs "
          f"best neurons {r['neuron_precision']:.3f} at the same recall, over {r['patterns']} states")
    out = dict(site=top, code_precision=r["code_precision"], code_recall=r["code_recall"],
               neuron_precision=r["neuron_precision"], state_digit=sites[top]["state_digit"], sites=sites,
               per_state=table[top], n_seqs=cfg["n_seqs"], seed=cfg["seed"], wall_s=time.time() - t0)
    write_json(cfg, "states.json", out)
    return out


@torch.no_grad()
def patched_run(model, x, codes, sites, steps, base):
    """x (B, L) inputs; codes {site: (B, G, k)} forced at position L-1 of each row. Rows that force the
    same codes share one forward pass. -> next-token probs at L-1 (B, V) and `steps` greedy digits (B, steps)."""
    B, L = x.shape
    key = torch.cat([codes[s].reshape(B, -1) for s in sites], 1) if sites else torch.zeros(B, 1, dtype=torch.long)
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)
    probs, greedy = torch.zeros(B, model.config.vocab_size), torch.zeros(B, steps, dtype=torch.long)
    for u in range(len(uniq)):
        rows = (inv == u).nonzero().squeeze(1)
        ivs = [Intervention(s, g, int(c[g, j]), positions=(L - 1,))
               for s in sites for c in [codes[s][rows[0]]] for g in range(c.shape[0])
               for j in reversed(range(c.shape[1]))]  # slot k-1 first: the k forced codes fill slots k-1..0
        xr = x[rows]
        for step in range(max(1, steps)):
            logits = model(xr, interventions=ivs)[0][:, -1]  # (b, V)
            if step == 0:
                probs[rows] = F.softmax(logits.float(), -1).cpu()
            if steps:
                d = logits[:, :base].argmax(-1)  # digits only: the next state's digits
                greedy[rows, step] = d.cpu()
                xr = torch.cat([xr, d[:, None]], 1)
    return probs, greedy


def cmd_patch(cfg, ckpt, model):
    fsm = need_fsm(ckpt, "patch")
    t0 = time.time()
    D, N, n = fsm.digits, fsm.num_states, cfg["ctx_states"]
    L = 1 + D * n
    if L + D - 1 > model.config.block_size:
        fail(f"--ctx_states={n}: 1 + {D}*{n} tokens plus {D - 1} greedy digits exceed block_size {model.config.block_size}")
    gen = torch.Generator().manual_seed(cfg["seed"])
    walks = fsm.sample_states(max(20 * N, 4 * cfg["pairs"]), n, gen)  # (pool, n): the pool of inputs
    pool, last = fsm.encode(walks, L), walks[:, -1]
    count = torch.bincount(last, minlength=N)
    have = count.nonzero().squeeze(1)  # states some pool input ends in
    if len(have) < 2:
        fail("fewer than two states reachable as the last state of an input: try a larger --ctx_states")
    order, start = torch.argsort(last, stable=True), count.cumsum(0) - count
    s = have[torch.randint(len(have), (cfg["pairs"],), generator=gen)]
    t = have[(torch.searchsorted(have, s) + torch.randint(1, len(have), (cfg["pairs"],), generator=gen)) % len(have)]

    def pick(st):  # a random pool input ending in each state of st
        return order[start[st] + (torch.rand(len(st), generator=gen) * count[st]).long()]
    dev = next(model.parameters()).device
    xs, xt = pool[pick(s)].to(dev), pool[pick(t)].to(dev)  # (pairs, L): inputs ending in s, in t
    codes_t, _, logits_t = run(model, xt, cfg["batch_size"], desc="target inputs")
    p_t = F.softmax(logits_t[:, -1].float(), -1)  # (pairs, V): the model's own distribution in state t
    last_codes = {site: c[:, -1] for site, c in codes_t.items()}  # (pairs, G, k)
    cbs = list(model.codebooks())
    conditions = dict(none=[], **{site: [site] for site in cbs})
    for kind in ("attn", "mlp"):
        if any(x.endswith(kind) for x in cbs):
            conditions[f"all_{kind}"] = [x for x in cbs if x.endswith(kind)]
    conditions["all"] = cbs
    raw, greedy = {}, {}
    for name in tqdm(conditions, desc="conditions", disable=None, leave=False):
        steps = D if name in ("none", "all_mlp") else 0
        p, greedy[name] = patched_run(model, xs, last_codes, conditions[name], steps, fsm.base)
        raw[name] = jsd(p, p_t).mean().item()
    norm = {k: v / raw["none"] for k, v in raw.items()}
    succ = torch.as_tensor(fsm.transitions > 0)
    digits_value = torch.as_tensor([fsm.base ** (D - 1 - j) for j in range(D)])

    def succ_of(g, st):  # is the greedy next state (B,) a successor of st (B,)?
        nxt = (g.cpu() * digits_value).sum(1)
        ok = nxt < N
        return ok & succ[st, nxt.clamp_max(N - 1)]
    out = dict(jsd=norm, jsd_raw=raw, pairs=cfg["pairs"], ctx_states=n, seed=cfg["seed"])
    if "all_mlp" in greedy:
        ok_t = succ_of(greedy["all_mlp"], t)
        out.update(force_success=ok_t.float().mean().item(),
                   force_success_excl=(ok_t & ~succ_of(greedy["all_mlp"], s)).float().mean().item(),
                   force_baseline=succ_of(greedy["none"], t).float().mean().item())
    out["wall_s"] = time.time() - t0
    for k, v in norm.items():
        print(f"{k:10s} normalised JSD {v:.3f}  (raw {raw[k]:.4f} nats)")
    if "force_success" in out:
        print(f"forcing t's MLP codes: greedy next state is a successor of t in {out['force_success']:.3f} of trials "
              f"({out['force_success_excl']:.3f} not also of s; {out['force_baseline']:.3f} with no patch)")
    write_json(cfg, "patch.json", out)
    return out


def cmd_usage(cfg, ckpt, model):
    fsm = need_fsm(ckpt, "usage")
    codes, _, _ = run(model, sample_fsm(fsm, cfg, model.config.block_size), cfg["batch_size"])
    out = {}
    buckets = [(0, 0), (1, 9), (10, 99), (100, 999), (1000, 9999), (10000, float("inf"))]  # firings per code
    for site, cb in model.codebooks().items():
        G, C = cb.groups, cb.num_codes
        n = torch.bincount(flat_ids(codes[site], C).reshape(-1), minlength=G * C).view(G, C).double()
        p = n / n.sum(1, keepdim=True)
        entropy = -(torch.xlogy(p, p) / math.log(2)).sum(1).mean().item()
        hist = {(str(lo) if lo == hi else f"{lo}+" if hi == float("inf") else f"{lo}-{hi}"): int(((n >= lo) & (n <= hi)).sum())
                for lo, hi in buckets}
        out[site] = dict(alive=(n > 0).double().mean().item(), entropy_bits=entropy,
                         max_entropy_bits=math.log2(C), histogram=hist)
        print(f"{site:10s} alive {out[site]['alive']:.3f}  entropy {entropy:.2f} of {math.log2(C):.2f} bits")
        for k, v in hist.items():
            print(f"    fired {k:>9s} times: {v:6d} codes {'#' * math.ceil(40 * v / (G * C))}")
    write_json(cfg, "usage.json", out)
    return out


def cmd_show(cfg, ckpt, model, address):
    fsm = need_fsm(ckpt, "show")
    (iv,) = parse_codes(model, address)
    cb = model.codebooks()[iv.site]
    tokens = sample_fsm(fsm, cfg, model.config.block_size)
    codes, acts, _ = run(model, tokens, cfg["batch_size"], keep=(f"{iv.site}.in",))
    fired = (codes[iv.site][:, :, iv.group] == iv.code).any(-1).reshape(-1)  # (B*T,)
    where = fired.nonzero().squeeze(1)
    x = cb.normalize(acts[f"{iv.site}.in"][where].to(cb.codebook.device))[:, iv.group]  # (n, d) in LN space
    c = cb.codebook[iv.group, iv.code]
    score = (x @ c / c.norm()).cpu()  # cosine-style similarity: how strongly each firing selects the code
    render = tokenizer(ckpt)[2]
    state, digit = fsm.state_labels(tokens)
    L = tokens.shape[1]
    print(f"{address} fires at {len(where)} of {fired.numel()} positions ({len(where) / fired.numel():.4f})")
    lab = (state.reshape(-1)[where] * fsm.digits + digit.reshape(-1)[where]).clamp_min(-1)
    if len(where):
        vals, cnt = torch.unique(lab, return_counts=True)
        for i in cnt.argsort(descending=True)[:5].tolist():
            v = int(vals[i])
            what = "BOS or a cut-off state" if v < 0 else f"state {v // fsm.digits} digit {v % fsm.digits}"
            print(f"  {cnt[i] / len(where):6.1%} at {what}")
    rows = []
    for i in score.argsort(descending=True)[:cfg["top"]].tolist():
        b, p = divmod(int(where[i]), L)
        lo = max(0, p - cfg["context"])
        text = render(tokens[b, lo:p + 3].tolist(), lo, p)
        rows.append(dict(seq=b, pos=p, score=round(score[i].item(), 4), text=text))
        print(f"  {score[i]:7.3f}  seq {b:4d} pos {p:3d}  {text}")
    out = dict(code=address, firings=len(where), positions=fired.numel(), top=rows)
    write_json(cfg, "show.json", out)
    return out


def cmd_search(cfg, ckpt, model, regex):
    fsm = need_fsm(ckpt, "search")
    try:
        pattern = re.compile(regex)
    except re.error as e:
        fail(f"bad regex {regex!r}: {e}")
    tokens = sample_fsm(fsm, cfg, model.config.block_size)
    decode = tokenizer(ckpt)[1]
    B, L = tokens.shape
    labels = torch.full((B, L), -1)
    for b in range(B):  # a position matches if a match of the regex ends at its token
        pieces = decode(tokens[b].tolist())
        ends = torch.tensor([len(s) for s in pieces]).cumsum(0)  # one past each token's last character
        for m in pattern.finditer("".join(pieces)):
            if m.end() > m.start():
                labels[b, torch.searchsorted(ends, m.end() - 1, right=True)] = 0
    labels = labels.reshape(-1)
    if not (labels == 0).any():
        fail(f"regex {regex!r} matches nowhere in {B} sampled sequences")
    codes, _, _ = run(model, tokens, cfg["batch_size"])
    rows = []
    for site, cb in model.codebooks().items():
        _, code, tp, fired, size = pair_counts(flat_ids(codes[site], cb.num_codes), labels, 1, cb.groups * cb.num_codes)
        prec, rec = tp / fired[code], tp / size[0]
        rows += [dict(code=code_name(site, c, cb.num_codes), precision=p, recall=r, f1=2 * p * r / (p + r), fired=int(f))
                 for c, p, r, f in zip(code.tolist(), prec.tolist(), rec.tolist(), fired[code].tolist())]
    rows.sort(key=lambda r: -r["f1"])
    print(f"{regex!r} matches {int((labels == 0).sum())} of {labels.numel()} positions; best codes by F1:")
    for r in rows[:cfg["top"]]:
        print(f"  {r['code']:16s} precision {r['precision']:.3f} recall {r['recall']:.3f} f1 {r['f1']:.3f} fired {r['fired']}")
    out = dict(regex=regex, matches=int((labels == 0).sum()), codes=rows[:max(cfg["top"], 100)])
    write_json(cfg, "search.json", out)
    return out


def cmd_generate(cfg, ckpt, model):
    encode, _, render = tokenizer(ckpt)
    fsm = need_fsm(ckpt, "generate")
    idx = torch.tensor([encode(cfg["prompt"])] * cfg["n"])
    T0, new = idx.shape[1], cfg["max_new_tokens"]
    if T0 + new - 1 > model.config.block_size:
        fail(f"{T0} prompt tokens (with BOS) + {new} new tokens exceed block_size {model.config.block_size}")
    named = dict(all=None, prompt=tuple(range(T0)), new=tuple(range(T0, T0 + new)))  # absolute positions
    try:
        positions = named[cfg["at"]] if cfg["at"] in named else tuple(int(p) for p in cfg["at"].split(","))
    except ValueError:
        fail(f"--at={cfg['at']}: expected all, prompt, new or positions like 3,4,5")
    ivs = parse_codes(model, cfg["force"], False, positions) + parse_codes(model, cfg["ablate"], True, positions)
    k = {s: cb.k for s, cb in model.codebooks().items()}
    for iv in ivs:
        if sum(j.site == iv.site and j.group == iv.group and not j.ablate for j in ivs) > k[iv.site]:
            fail(f"more than k={k[iv.site]} codes forced into {iv.site} group {iv.group}")
    dev = next(model.parameters()).device
    out = {}
    for name, use in (("baseline", []), ("steered", ivs)):
        gen = torch.Generator(device=dev).manual_seed(cfg["seed"])  # the same noise for both: only the codes differ
        y = model.generate(idx.to(dev), new, cfg["temperature"], cfg["top_k"] or None, use, gen).cpu()
        texts = [render(row) for row in y.tolist()]
        out[name] = dict(samples=texts, state_acc=fsm.state_accuracy(y))
        print(f"{name} (valid transitions {out[name]['state_acc']:.3f}):")
        for s in texts:
            print("  " + s)
    out.update(prompt=cfg["prompt"], force=cfg["force"], ablate=cfg["ablate"], at=cfg["at"], seed=cfg["seed"])
    write_json(cfg, "generate.json", out)
    return out


def main(argv=None):
    cmd, arg, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    ckpt, model = load(cfg)
    fn = globals()[f"cmd_{cmd}"]
    return fn(cfg, ckpt, model, arg) if arg is not None else fn(cfg, ckpt, model)


if __name__ == "__main__":
    main()
