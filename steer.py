"""
Read and control a trained TokFSM codebook model: which codes stand for which FSM states (codes vs
neurons), what patching them does, and sampling with codes forced or ablated. One command each:

    python steer.py states --ckpt=out-fsm/ckpt.pt     # codes vs neurons as classifiers of the state
    python steer.py patch --ckpt=out-fsm/ckpt.pt      # force the codes of state t into an input in state s
    python steer.py usage --ckpt=out-fsm/ckpt.pt      # alive codes, usage entropy, a histogram
    python steer.py show L1.mlp:88 --ckpt=out-fsm/ckpt.pt       # the top contexts of one code
    python steer.py search '\\|3' --ckpt=out-fsm/ckpt.pt         # codes that fire where a regex matches
    python steer.py generate --ckpt=out-fsm/ckpt.pt --prompt=3712 --force=L1.mlp:5 --at=new

Flags are --key=value; `python steer.py COMMAND --help` lists a command's flags and defaults. Each
command writes COMMAND.json next to the checkpoint; errors are one line on stderr, exit status 2.
FSM tokens read as digits, BOS as '|': `search` matches its regex against text like "|371245...".
usage, show and search read language-model checkpoints too (windows of the val.bin they were trained on,
or --data_dir). (Steering language models by topic is topics.py; usage, show and search for every code at
once, as one HTML page, is browse.py.)

Definitions (the paper's TokFSM experiment, Tamkin et al., "Codebook Features"). A pattern is a set M
of positions of the sampled sequences:
  state s           the last digit of state s (where "the current state is s");
  state+digit (s,d) the first digit of the state after s, when that digit is d.
  A code fires where its codebook selects it (any of the k slots); recall = |M and fired| / |M|,
  precision = |M and fired| / |fired|, over every position of every sequence (BOS included). The best
  code of a pattern has the highest F1 = 2PR / (P + R) among all codes of the site (all heads).
  Neurons of the same layer: for L{i}.mlp the GELU units (L{i}.mlp.hidden), the MLP output before its
  codebook (L{i}.mlp.in) and the residual after the block (L{i}.resid); for L{i}.attn the merged head
  outputs before its codebook (L{i}.attn.in). A neuron's threshold is its n-th largest activation on M,
  n = ceil(r |M|) with r the best code's recall; it fires where its activation >= that (recall r, more
  on ties). Both signs are tried (-a is a neuron too); the best neuron has the highest precision.
  `states` reports the site whose best state codes have the highest mean F1.
  patch: in each trial an input ending in s (last token = last digit of s) and one ending in t != s,
  both BOS + ctx_states states. The codes that the t-input selects at its last position (every group,
  every slot) are forced at the s-input's last position; the score is the mean JSD between the patched
  next-token distribution and the model's own on the t-input, divided by the same with no patch.
  force_success: with all MLP codes patched, the fraction of trials whose next-token distribution puts
  more mass on first digits of t's successors than on first digits of s's successors (digits that start
  successors of both count on both sides). greedy_success: the next state decoded greedily digit by
  digit (the patch stays at its position) is a successor of t; *_baseline: the same with no patch.
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import math
import re
import sys
import time

import torch
import torch.nn.functional as F

from helpers.common import Progress, exit_on_help, fail, parse_flags
from codebook import Intervention
from helpers.readout import (code_counts, code_name, code_scores, firings_by_score, flat_ids, load_codebook_model, need_fsm,
                     pair_counts, parse_codes, regex_labels, run, sample_sequences, search_codes, tokenizer,
                     usage_stats, write_json)

FLAGS = dict(  # every flag and its default; the default's type is the flag's type
    ckpt="",  # a checkpoint written by train.py (required)
    device="auto",  # auto (cuda if there is one, else mps, else cpu), cpu, cuda or mps
    seed=0,  # seed of the sampled sequences, the trials and the samples
    n_seqs=500,  # sequences sampled by states, usage, show and search (a language model: windows of val.bin)
    data_dir="",  # usage, show, search on a language model: its token data ("": the one it was trained on)
    batch_size=100,  # sequences per forward pass
    min_count=5,  # states: patterns seen fewer times are left out of the means
    pairs=500,  # patch: random (s, t) trials
    ctx_states=8,  # patch: states per input, after BOS
    top=10,  # show, search: rows printed
    context=24,  # show: tokens of context before the firing token
    prompt="",  # generate: the prompt after BOS, digits for the FSM
    force="",  # generate: codes forced, e.g. L1.mlp:5,L1.attn.h2:40
    ablate="",  # generate: codes ablated
    at="all",  # generate: where: all, prompt, new (the generated tokens) or positions like 3,4,5
    n=4,  # generate: samples
    max_new_tokens=32,  # generate
    temperature=1.0,  # generate
    top_k=0,  # generate: 0 = no top-k cut
)
COMMON = ("ckpt", "device", "seed", "batch_size")
COMMANDS = dict(  # command: (its positional argument or None, its flags)
    states=(None, COMMON + ("n_seqs", "min_count")),
    patch=(None, COMMON + ("pairs", "ctx_states")),
    usage=(None, COMMON + ("n_seqs", "data_dir")),
    show=("CODE", COMMON + ("n_seqs", "data_dir", "top", "context")),
    search=("REGEX", COMMON + ("n_seqs", "data_dir", "top")),
    generate=(None, COMMON + ("prompt", "force", "ablate", "at", "n", "max_new_tokens", "temperature", "top_k")),
)


def parse_args(argv):
    """['show', 'L2.mlp:88', '--ckpt=x.pt'] -> (command, positional argument or None, flags dict)."""
    if argv and argv[0] == "topics":  # it was a command of this script until topics.py took it over
        fail("topic steering moved to its own script: python topics.py --ckpt=PATH [--key=value ...]")
    if not argv or argv[0] not in COMMANDS:
        exit_on_help(argv, __doc__, FLAGS)  # --help before a command: this text and every flag
        fail(f"usage: python steer.py COMMAND [ARG] --ckpt=PATH [--key=value ...]; commands: {', '.join(COMMANDS)}")
    cmd, rest = argv[0], argv[1:]
    arg_name, allowed = COMMANDS[cmd]
    defaults = {k: FLAGS[k] for k in allowed}
    usage = f"python steer.py {cmd} {arg_name + ' ' if arg_name else ''}--ckpt=PATH [--key=value ...]"
    given, positional = parse_flags(rest, defaults, usage, positional=True, where=f" for {cmd}")
    cfg = {**defaults, **given}
    if len(positional) != bool(arg_name):
        fail(f"{cmd} takes {'one argument, ' + arg_name if arg_name else 'no argument'}; got {positional or 'none'}")
    if not cfg["ckpt"]:
        fail("--ckpt=PATH is required")
    for key in ("n_seqs", "batch_size", "pairs", "ctx_states", "top", "n", "max_new_tokens"):
        if cfg.get(key, 1) < 1:
            fail(f"--{key}={cfg[key]}: must be >= 1")
    if cfg["device"] not in ("cpu", "cuda", "mps", "auto") or cfg.get("temperature", 1.0) <= 0:
        fail("--device must be cpu, cuda, mps or auto, and --temperature > 0")
    return cmd, (positional or [None])[0], cfg


# -----------------------------------------------------------------------------
# the math: pure functions of tensors


def best_codes(ids, labels, num_labels, num_codes):
    """The highest-F1 code of every pattern -> code (-1 if the pattern never occurs), precision, recall."""
    lab, code, tp, fired, size = pair_counts(ids, labels, num_labels, num_codes)
    prec, rec = tp / fired[code].double(), tp / size[lab].double()  # double: recall * |M| gives tp back
    order = torch.sort(lab * 2.0 + 2 * prec * rec / (prec + rec), stable=True).indices  # by pattern, then F1
    pick = order[(torch.searchsorted(lab[order], torch.arange(num_labels), right=True) - 1).clamp_min(0)]
    ok, z = size > 0, torch.zeros(num_labels, dtype=torch.double)
    return torch.where(ok, code[pick], -1), torch.where(ok, prec[pick], z), torch.where(ok, rec[pick], z)


def neuron_precision(acts, sorted_all, labels, recall):
    """Neurons thresholded at each pattern's recall. acts (P, H) at all positions, sorted_all (H, P) the same
    sorted ascending per unit, labels (P,) pattern id or -1, recall (S,) -> precision (S, H), recall (S, H)
    of +a, then the same two of -a. Unit h fires where a >= its n-th largest value on M_s, n = ceil(r |M_s|)."""
    S, (P, H) = len(recall), acts.shape
    m = labels >= 0
    a = acts[m][torch.argsort(labels[m], stable=True)].T.contiguous()  # (H, Q): each pattern contiguous
    size = torch.bincount(labels[m], minlength=S)
    start = (size.cumsum(0) - size).tolist()
    n = (recall.double() * size - 1e-6).ceil().long().clamp(min=1).minimum(size.clamp_min(1)).tolist()
    thr = torch.zeros(2, S, H, dtype=acts.dtype)  # +a fires where a >= thr[0], -a where a <= thr[1]
    tp = torch.zeros(2, S, H, dtype=torch.long)
    for s in size.nonzero().squeeze(1).tolist():  # a loop over patterns, vectorised over units
        seg = a[:, start[s]:start[s] + size[s]].sort(dim=1).values  # (H, |M_s|) ascending
        thr[0, s], thr[1, s] = seg[:, -n[s]], seg[:, n[s] - 1]  # n-th largest; n-th smallest = -(-a's n-th largest)
        tp[0, s] = size[s] - torch.searchsorted(seg, thr[0, s, :, None]).squeeze(1)  # ties fire too
        tp[1, s] = torch.searchsorted(seg, thr[1, s, :, None], right=True).squeeze(1)
    fired_pos = P - torch.searchsorted(sorted_all, thr[0].T.contiguous())  # (H, S)
    fired_neg = torch.searchsorted(sorted_all, thr[1].T.contiguous(), right=True)
    rec = tp / size.clamp_min(1)[None, :, None]
    return tp[0] / fired_pos.T.clamp_min(1), rec[0], tp[1] / fired_neg.T.clamp_min(1), rec[1]


def successor_starts(fsm):
    """(N, base) bool: [x, d] is True where some successor of state x begins with digit d."""
    u, v = torch.as_tensor(fsm.transitions > 0).nonzero().unbind(1)
    starts = torch.zeros(fsm.num_states, fsm.base, dtype=torch.bool)
    starts[u, torch.as_tensor(fsm.state_digits[:, 0])[v]] = True
    return starts


def jsd(p, q):
    """Jensen-Shannon divergence (nats) of distributions along the last dim: (..., V), (..., V) -> (...)."""
    m = 0.5 * (p + q)
    return 0.5 * ((torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1))


# -----------------------------------------------------------------------------
# FSM positions and neurons


def neuron_sources(site):
    layer, kind = site.split(".")
    return [f"{site}.in"] if kind == "attn" else [f"{site}.hidden", f"{site}.in", f"{layer}.resid"]


def sequences(cfg, ckpt, model):
    """What states, usage, show and search read: FSM walks, or a language model's val.bin windows."""
    return sample_sequences(ckpt, cfg["n_seqs"], model.config.block_size, cfg["seed"], cfg.get("data_dir", ""))


# -----------------------------------------------------------------------------
# commands


def cmd_states(cfg, ckpt, model):
    fsm, t0 = need_fsm(ckpt, "states"), time.time()
    tokens = sequences(cfg, ckpt, model)  # (B, L): fsm's walks
    state, digit = fsm.state_labels(tokens)  # (B, L) each
    prev = torch.cat([torch.full_like(state[:, :1], -1), state[:, :-1]], 1)  # the state one position back
    families = dict(  # pattern id per position, -1 outside the family's patterns
        state=torch.where((digit == fsm.digits - 1) & (state >= 0), state, -1).reshape(-1),
        state_digit=torch.where((digit == 0) & (prev >= 0), prev * fsm.base + tokens, -1).reshape(-1))
    num = dict(state=fsm.num_states, state_digit=fsm.num_states * fsm.base)
    cbs = model.codebooks()
    codes, acts, _ = run(model, tokens, cfg["batch_size"], sorted({k for s in cbs for k in neuron_sources(s)}))
    sites, table = {}, {}
    bar = Progress(len(cbs), "sites")
    for site, cb in cbs.items():
        ids, C = flat_ids(codes[site], cb.num_codes), cb.num_codes
        sorted_all = {k: acts[k].T.contiguous().sort(dim=1).values for k in neuron_sources(site)}  # (H, P)
        sites[site] = {}
        for fam, labels in families.items():
            code, prec, rec = best_codes(ids, labels, num[fam], cb.groups * C)
            size = torch.bincount(labels[labels >= 0], minlength=num[fam])
            best, who = torch.full((num[fam],), -1.0), [""] * num[fam]
            for src in neuron_sources(site):  # the best neuron of each pattern: over sources, units, signs
                pp, _, pn, _ = neuron_precision(acts[src], sorted_all[src], labels, rec)
                for sign, p in (("+", pp), ("-", pn)):
                    v, h = p.max(1)
                    for s in (v > best).nonzero().squeeze(1).tolist():
                        who[s] = f"{sign}{src}[{h[s]}]"
                    best = torch.maximum(best, v)
            ok = size >= cfg["min_count"]
            f1 = 2 * prec * rec / (prec + rec).clamp_min(1e-12)
            sites[site][fam] = dict(patterns=int(ok.sum()), code_precision=prec[ok].mean().item(),
                                    code_recall=rec[ok].mean().item(), code_f1=f1[ok].mean().item(),
                                    neuron_precision=best[ok].mean().item())
            if fam == "state":
                table[site] = [dict(state=s, count=int(size[s]), code=code_name(site, code[s], C),
                                    precision=round(prec[s].item(), 4), recall=round(rec[s].item(), 4),
                                    neuron=who[s], neuron_precision=round(best[s].item(), 4))
                               for s in range(fsm.num_states) if ok[s]]
        bar.update()
    bar.close()
    print(f"{'':10s} | {'state: code prec':>16s} {'recall':>6s} {'neuron prec':>11s} | "
          f"{'state+digit: code prec':>22s} {'recall':>6s} {'neuron prec':>11s}")
    for site, r in sites.items():
        a, b = r["state"], r["state_digit"]
        print(f"{site:10s} | {a['code_precision']:16.3f} {a['code_recall']:6.3f} {a['neuron_precision']:11.3f} | "
              f"{b['code_precision']:22.3f} {b['code_recall']:6.3f} {b['neuron_precision']:11.3f}")
    top = max(sites, key=lambda s: sites[s]["state"]["code_f1"])
    r = sites[top]["state"]
    print(f"best site {top}: state codes precision {r['code_precision']:.3f} (recall {r['code_recall']:.3f}), "
          f"best neurons {r['neuron_precision']:.3f} at the same recall, over {r['patterns']} states")
    out = dict(site=top, code_precision=r["code_precision"], code_recall=r["code_recall"],
               neuron_precision=r["neuron_precision"], state_digit=sites[top]["state_digit"], sites=sites,
               per_state=table[top], n_seqs=cfg["n_seqs"], seed=cfg["seed"],
               device=str(next(model.parameters()).device), wall_s=time.time() - t0)
    write_json(cfg["ckpt"], "states.json", out)
    return out


@torch.no_grad()
def patched_run(model, x, codes, sites, steps, base):
    """x (B, L); codes {site: (B, G, k)} forced at position L-1, row by row, in the codebooks of `sites`
    -> next-token probs at L-1 (B, V) and `steps` greedy digits (B, steps), the patch kept at L-1.
    Interventions hold for a whole batch, so rows that force the same codes share a forward pass."""
    B, L = x.shape
    key = torch.cat([codes[s].reshape(B, -1) for s in sites] + [torch.zeros(B, 1, dtype=torch.long)], 1)
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)
    probs, greedy = torch.zeros(B, model.config.vocab_size), torch.zeros(B, steps, dtype=torch.long)
    for u in range(len(uniq)):
        rows = (inv == u).nonzero().squeeze(1)
        c = {s: codes[s][rows[0]] for s in sites}  # (G, k) each
        ivs = [Intervention(s, g, int(c[s][g, j]), positions=(L - 1,)) for s in sites
               for g in range(c[s].shape[0]) for j in reversed(range(c[s].shape[1]))]  # fills slots k-1 .. 0
        xr = x[rows]
        for step in range(max(1, steps)):
            logits = model(xr, interventions=ivs)[0][:, -1].cpu()  # (b, V)
            if step == 0:
                probs[rows] = F.softmax(logits.float(), -1)
            if steps:
                greedy[rows, step] = d = logits[:, :base].argmax(-1)  # digits only
                xr = torch.cat([xr, d[:, None].to(xr.device)], 1)
    return probs, greedy


def cmd_patch(cfg, ckpt, model):
    fsm, t0 = need_fsm(ckpt, "patch"), time.time()
    D, N, n = fsm.digits, fsm.num_states, cfg["ctx_states"]
    L = 1 + D * n
    if L + D - 1 > model.config.block_size:
        fail(f"--ctx_states={n}: {L} tokens plus {D - 1} greedy digits exceed block_size {model.config.block_size}")
    gen = torch.Generator().manual_seed(cfg["seed"])
    walks = fsm.sample_states(max(20 * N, 4 * cfg["pairs"]), n, gen)  # (pool, n): the inputs to draw from
    pool, last = fsm.encode(walks, L), walks[:, -1]
    count = torch.bincount(last, minlength=N)
    have = count.nonzero().squeeze(1)  # the states that some input ends in
    if len(have) < 2:
        fail("fewer than two distinct last states among the inputs: try another --ctx_states")
    order, start = torch.argsort(last, stable=True), count.cumsum(0) - count
    s = have[torch.randint(len(have), (cfg["pairs"],), generator=gen)]
    t = have[(torch.searchsorted(have, s) + torch.randint(1, len(have), (cfg["pairs"],), generator=gen)) % len(have)]
    xs, xt = (pool[order[start[st] + (torch.rand(len(st), generator=gen) * count[st]).long()]] for st in (s, t))
    codes_t, _, logits_t = run(model, xt, cfg["batch_size"], desc="t-inputs")  # (pairs, L) inputs in s, in t
    p_t = F.softmax(logits_t[:, -1].float(), -1)  # (pairs, V): the model's own distribution in state t
    last_codes = {site: c[:, -1] for site, c in codes_t.items()}  # (pairs, G, k)
    cbs = list(model.codebooks())
    conditions = dict(none=[], **{site: [site] for site in cbs})
    for kind in ("attn", "mlp"):
        if any(x.endswith(kind) for x in cbs):
            conditions[f"all_{kind}"] = [x for x in cbs if x.endswith(kind)]
    conditions["all"] = cbs
    raw, probs, greedy = {}, {}, {}
    dev = next(model.parameters()).device
    bar = Progress(len(conditions), "conditions")
    for name in conditions:
        steps = D if name in ("none", "all_mlp") else 0
        probs[name], greedy[name] = patched_run(model, xs.to(dev), last_codes, conditions[name], steps, fsm.base)
        raw[name] = jsd(probs[name], p_t).mean().item()
        bar.update()
    bar.close()
    norm = {k: v / raw["none"] for k, v in raw.items()}
    succ, starts = torch.as_tensor(fsm.transitions > 0), successor_starts(fsm)  # (N, N), (N, base)
    place = torch.as_tensor([fsm.base ** (D - 1 - j) for j in range(D)])

    def moved(p):  # more next-token mass on first digits of t's successors than on those of s's
        return ((p[:, :fsm.base] * starts[t]).sum(-1) > (p[:, :fsm.base] * starts[s]).sum(-1)).float().mean().item()

    def greedy_ok(g):  # the greedy next state is a successor of t
        nxt = (g * place).sum(1)
        return ((nxt < N) & succ[t, nxt.clamp_max(N - 1)]).float().mean().item()
    out = dict(jsd=norm, jsd_raw=raw)
    if "all_mlp" in probs:
        out.update(force_success=moved(probs["all_mlp"]), force_baseline=moved(probs["none"]),
                   greedy_success=greedy_ok(greedy["all_mlp"]), greedy_baseline=greedy_ok(greedy["none"]))
    out.update(pairs=cfg["pairs"], ctx_states=n, seed=cfg["seed"], device=str(dev), wall_s=time.time() - t0)
    for k, v in norm.items():
        print(f"{k:10s} normalised JSD {v:.3f}  (raw {raw[k]:.4f} nats)")
    if "force_success" in out:
        print(f"t's MLP codes forced: the next digit favours t's successors over s's in {out['force_success']:.3f} "
              f"of trials ({out['force_baseline']:.3f} with no patch); the greedy next state is a successor of t "
              f"in {out['greedy_success']:.3f} ({out['greedy_baseline']:.3f} with no patch)")
    write_json(cfg["ckpt"], "patch.json", out)
    return out


def cmd_usage(cfg, ckpt, model):
    codes, _, _ = run(model, sequences(cfg, ckpt, model), cfg["batch_size"])
    out = {}
    for site, cb in model.codebooks().items():
        out[site] = u = usage_stats(code_counts(codes[site], cb))
        print(f"{site:10s} alive {u['alive']:.3f}, entropy {u['entropy_bits']:.2f} of {u['max_bits']:.2f} bits")
        for k, v in u["histogram"].items():
            print(f"    {v:6d} codes fired {k:>11s} times {'#' * math.ceil(40 * v / (cb.groups * cb.num_codes))}")
    write_json(cfg["ckpt"], "usage.json", out)
    return out


def cmd_show(cfg, ckpt, model, address):
    (iv,) = parse_codes(model, address)
    cb, tokens = model.codebooks()[iv.site], sequences(cfg, ckpt, model)
    codes, acts, _ = run(model, tokens, cfg["batch_size"], keep=(f"{iv.site}.in",))
    scores = code_scores(cb, acts[f"{iv.site}.in"], codes[iv.site])  # (B*T, G, k): its cosine score in LN space
    where, score = firings_by_score(codes[iv.site], scores, iv.group, iv.code)  # best first
    positions = tokens.numel()
    print(f"{address} fires at {len(where)} of {positions} positions ({len(where) / positions:.4f})")
    if ckpt.get("kind") == "fsm":  # where in the walks: which state and digit
        fsm = need_fsm(ckpt, "show")
        state, digit = (t.reshape(-1)[where] for t in fsm.state_labels(tokens))
        what, cnt = torch.unique(torch.where(state >= 0, state * fsm.digits + digit, -1), return_counts=True)
        for i in cnt.argsort(descending=True)[:5].tolist():
            w = int(what[i])
            print(f"  {cnt[i] / len(where):6.1%} at " + (f"state {w // fsm.digits} digit {w % fsm.digits}"
                                                         if w >= 0 else "BOS or an unfinished state"))
    render, L, rows = tokenizer(ckpt)[2], tokens.shape[1], []
    for i in range(min(cfg["top"], len(where))):
        b, p = divmod(int(where[i]), L)
        lo = max(0, p - cfg["context"])
        text = render(tokens[b, lo:p + 3].tolist(), lo, p)
        rows.append(dict(seq=b, pos=p, score=round(score[i].item(), 4), text=text))
        print(f"  {score[i]:7.3f}  seq {b:4d} pos {p:3d}  {text}")
    out = dict(code=address, firings=len(where), positions=positions, top=rows)
    write_json(cfg["ckpt"], "show.json", out)
    return out


def cmd_search(cfg, ckpt, model, regex):
    tokens, decode = sequences(cfg, ckpt, model), tokenizer(ckpt)[1]
    try:
        pattern = re.compile(regex)
    except re.error as e:
        fail(f"bad regex {regex!r}: {e}")
    labels = regex_labels(tokens, decode, pattern)  # 0 where a match ends at the token
    if not (labels == 0).any():
        fail(f"regex {regex!r} matches nowhere in {len(tokens)} sampled sequences")
    codes, _, _ = run(model, tokens, cfg["batch_size"])
    rows = search_codes(codes, model.codebooks(), labels)
    print(f"/{regex}/ matches at {int((labels == 0).sum())} of {labels.numel()} positions; the best codes by F1:")
    for r in rows[:cfg["top"]]:
        print(f"  {r['code']:16s} precision {r['precision']:.3f} recall {r['recall']:.3f} F1 {r['f1']:.3f} "
              f"fired {r['fired']}")
    out = dict(regex=regex, matches=int((labels == 0).sum()), codes=rows[:max(cfg["top"], 100)])
    write_json(cfg["ckpt"], "search.json", out)
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
    for iv in ivs:
        if sum((j.site, j.group, j.ablate) == (iv.site, iv.group, False) for j in ivs) > model.codebooks()[iv.site].k:
            fail(f"more than k={model.codebooks()[iv.site].k} codes forced into {iv.site} group {iv.group}")
    dev, out = next(model.parameters()).device, {}
    for name, use in (("baseline", []), ("steered", ivs)):
        gen = torch.Generator(device=dev).manual_seed(cfg["seed"])  # the same noise for both: only the codes differ
        y = model.generate(idx.to(dev), new, cfg["temperature"], cfg["top_k"] or None, use, gen).cpu()
        out[name] = dict(samples=[render(row) for row in y.tolist()], state_acc=fsm.state_accuracy(y))
        print(f"{name} (valid transitions {out[name]['state_acc']:.3f}):\n  " + "\n  ".join(out[name]["samples"]))
    out.update(prompt=cfg["prompt"], force=cfg["force"], ablate=cfg["ablate"], at=cfg["at"], seed=cfg["seed"])
    write_json(cfg["ckpt"], "generate.json", out)
    return out

def main(argv=None):
    cmd, arg, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    ckpt, model = load_codebook_model(cfg["ckpt"], cfg["device"])
    fn = globals()[f"cmd_{cmd}"]
    return fn(cfg, ckpt, model) if arg is None else fn(cfg, ckpt, model, arg)


if __name__ == "__main__":
    main()
