"""
Steer a language model's text to a topic by forcing codes (the paper's section 3.3, Table 3), and
measure what the steering costs in fluency. On a checkpoint of train.py trained on token data:

    python topics.py --ckpt=out-stories-ft/ckpt.pt                 # the paper's protocol, 7 topics
    python topics.py --ckpt=out-text-ft/ckpt.pt --topics=sword=\\bswords?\\b,bread=\\bbread\\b --prompts="|And"
    python topics.py --ckpt=out-stories-ft/ckpt.pt --rule=inout --mode=one   # the rule before the effect rule
    python topics.py --ckpt=out-stories-ft/ckpt.pt --sweep=1,2,4,8,14,16 --sweep_per_head=8,4

Flags are --key=value (the config block below; `--help` prints them). Writes topics.json next to the
checkpoint; errors are one line on stderr, exit status 2 (also when no topic got a code).

Passages. Codes are picked on the passages of the data's --split (the text between two EOT tokens), each
labelled by the topics it mentions in the tokens the model reads. Three quarters are scanned for
statistics, the other quarter probes: forcing is measured there. The scored generations come from the
prompts, never from these passages. The text side (the topics' regexes, the passages read and what fires
in them, the prompts, the mention and repeat measures) is helpers/topic_text.py; this file is the method.

Topic codes, in two steps. (1) Candidates, ranked by --rule, from the scanned passages:
  effect   the best `candidates` of the window and lift rules, each forced alone on the probe passages,
           ranked by how much it raises the probability of the topic's tokens (the vocabulary entries the
           regex matches) at the next position: the codes that steer, measured, not guessed from firing;
  window   precision at the tokens up to --window before a regex match (those that predict the word);
  token    precision at the token where a regex match ends (as steer.py search ranks codes);
  lift     in / out, with in >= 1% (in: the share of the topic's passage tokens where the code fires,
           out: the same over the other passages' tokens);
  inout    in >= min_in and out <= max_out, by in - out (the rule that suits the synthetic stories);
  passage  recall over passages (a topic passage counts when the code fires in it) >= 0.2 with
           precision >= 0.01, by recall (the official topic browser's).
(2) Codes are taken best first while forcing them all keeps the estimated CE ratio (below) at most
max_ce_ratio, at most max_codes, and for the effect rule only while the topic's probability still rises.
The estimate, on the probe passages: the forced model's next-token distribution scored by the unforced
model (cross-entropy), over the unforced model's own entropy, which is what the CE ratio of generations
measures, at real text's positions.

Modes (the paper's Table 3a). one: each code takes one slot of its head (k-1, k-2, ...), at most
per_head per head; all: one code per head, all k slots of the head set to it. Forced at every position
(--at=all, the paper's way) or at the generated tokens only (--at=new), while sampling `samples`
continuations of each prompt (after EOT; temperature 1, no top-k; the same random draws in every
condition, so only the codes differ). Prompt + new tokens must fit block_size (no sliding window).
  baseline, steered   fraction of generations whose lowercased text matches the topic's regex;
  ce_ratio            fluency: the mean cross-entropy (nats per token) of the generated tokens under the
                      model with no interventions, steered over unsteered;
  rep                 the fraction of repeated 3-grams of generated tokens, averaged over generations;
  random              the control: as many codes in the same heads, each of about the same firing
                      frequency (the nearest ranks by firings in its head), forced the same way;
  matrix              topic A's steered generations scored with topic B's regex: codes that steer to
                      their own topic only have a large diagonal.
A topic that gets no code is named in a warning with the best candidate's figures; topics.json records
it (why_none). topics.json: topic -> {pattern, base_rate (share of scanned passages that mention it),
baseline, baseline_ce, baseline_rep, one / all: {steered, steered_ce, ce_ratio, steered_rep, n_codes,
n_forced, codes, figures, est_ce_ratio, random, sample, why_none}}; "mean" per mode; "matrix" per mode;
"settings"; with --sweep a "sweep" table (one mode, the rule's order, no estimate): per (per_head, number
of codes, place) the mean steered rate, CE and repeats (sweep_samples per prompt).
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import collections
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import tinystories_data
from codebook import Intervention
from helpers.common import Progress, fail, parse_args
from helpers.readout import code_name, load_codebook_model, tokenizer, write_json
from helpers.topic_text import encode_prompts, in_out, mention_rate, repeated_ngrams, scan_passages, topic_vocabulary

RULES = ("effect", "window", "token", "lift", "inout", "passage")
MODES = ("one", "all")
LIFT_FLOOR = 0.01  # the lift rule: a code fires on at least 1% of the topic's passage tokens
MIN_HITS = 3  # the window and token rules: a code fires at least this often where the regex points


@dataclass
class TopicsConfig:
    ckpt: str = ""  # a checkpoint of train.py on token data, with codebooks (required)
    device: str = "auto"  # auto (cuda if there is one, else mps, else cpu), cpu, cuda or mps
    seed: int = 0  # seed of the samples (prompt j draws from seed + j) and of the random control
    batch_size: int = 100  # passages per forward pass while scanning
    data_dir: str = ""  # the token data ("": the one the checkpoint was trained on)
    split: str = "val"  # the passages codes are picked on: val or train (the scored text is generated)
    topics: str = ""  # name or name=regex, comma separated ("": the data's topics, else the paper's seven)
    n_stories: int = 1000  # passages read, evenly spaced over the split
    rule: str = "effect"  # how candidate codes are ranked: effect, window, token, lift, inout, passage
    mode: str = "one,all"  # one: a code per slot; all: a head's k slots set to one code (comma separated)
    max_codes: int = 14  # at most this many codes per topic (the paper: 8 to 16)
    per_head: int = 4  # one mode: at most this many codes in one head (0: k)
    max_ce_ratio: float = 1.35  # codes are added while the estimated CE ratio stays at most this
    candidates: int = 48  # the effect rule: codes forced one by one on the probe passages, per topic and mode
    window: int = 8  # the window rule: tokens up to this many before a regex match
    probe_passages: int = 32  # passages (not scanned) on which forcing's effect and cost are measured
    probe_tokens: int = 128  # tokens of each probe passage read
    min_in: float = 0.1  # the inout rule: a code fires on at least this share of the topic's passage tokens
    max_out: float = 0.01  # and on at most this share of the other passages' tokens
    controls: bool = True  # the random-codes control per topic and mode (doubles the sampling time)
    at: str = "all"  # where: all (every position, the paper's) or new (the generated tokens only)
    samples: int = 10  # samples per prompt
    prompts: str = "|Once upon a time,|Once there was a|A long time ago,"  # '|'-separated, each after EOT
    max_new_tokens: int = 200
    temperature: float = 1.0
    sweep: str = ""  # numbers of codes to sweep, e.g. 1,2,4,8,16 ("": no sweep)
    sweep_at: str = "all,new"  # places to sweep
    sweep_per_head: str = ""  # caps per head to sweep, e.g. 8,3 ("": --per_head only)
    sweep_samples: int = 3  # samples per prompt in each sweep cell (cheaper than the protocol's 10)


PRESETS = {"default": {}}


def check(cfg):
    if not cfg.ckpt:
        fail("--ckpt=PATH is required")
    for key in ("batch_size", "n_stories", "max_codes", "samples", "max_new_tokens", "sweep_samples", "candidates",
                "window", "probe_passages", "probe_tokens"):
        if getattr(cfg, key) < 1:
            fail(f"--{key}={getattr(cfg, key)}: must be >= 1")
    if cfg.per_head < 0:
        fail(f"--per_head={cfg.per_head}: must be >= 0")
    if cfg.temperature <= 0 or cfg.max_ce_ratio <= 0:
        fail("--temperature and --max_ce_ratio must be > 0")
    if cfg.rule not in RULES:
        fail(f"--rule={cfg.rule}: valid: {', '.join(RULES)}")
    if cfg.split not in ("val", "train"):
        fail(f"--split={cfg.split}: valid: val, train")
    modes = cfg.mode.split(",")
    if not modes or any(m not in MODES for m in modes):
        fail(f"--mode={cfg.mode}: valid: one, all, or one,all")
    for at in [cfg.at] + cfg.sweep_at.split(","):
        if at not in ("all", "new"):
            fail(f"--at / --sweep_at: {at!r}: valid: all, new")
    lists = []
    for key, text, low in (("sweep", cfg.sweep, 1), ("sweep_per_head", cfg.sweep_per_head or str(cfg.per_head), 0)):
        try:
            lists.append([int(n) for n in text.split(",")] if text else [])
        except ValueError:
            fail(f"--{key}={text}: expected numbers like 1,2,4,8,16")
        if any(n < low for n in lists[-1]):
            fail(f"--{key}={text}: numbers must be >= {low}")
    return modes, lists[0], lists[1]


# -----------------------------------------------------------------------------
# the measures: pure functions


class Candidate(NamedTuple):
    """A code proposed for a topic: where it is, its rule's score, and the figures behind it."""
    address: str  # e.g. 'L1.attn.h2:40'
    site: str
    group: int
    code: int
    score: float
    figures: dict


def rule_scores(rule, st, cfg):
    """st: one site's counts (Scan.counts in helpers/topic_text.py) -> (score (K, C), ok (K, C) which codes
    the rule admits, figures {name: (K, C)} for the record)."""
    rin, rout = in_out(st)
    lift = rin / (rout + 1 / (st["n"] - st["n_in"]).clamp_min(1))
    prec_w = st["hit_window"] / st["fired"].clamp_min(1)
    prec_t = st["hit_match"] / st["fired"].clamp_min(1)
    rec_p = st["pass_in"] / st["n_pass_in"].clamp_min(1)
    prec_p = st["pass_in"] / st["pass_all"].clamp_min(1)
    figures = dict(rate_in=rin, rate_out=rout, lift=lift, window_precision=prec_w, token_precision=prec_t,
                   passage_recall=rec_p)
    score, ok = {
        "inout": (rin - rout, (rin >= cfg.min_in) & (rout <= cfg.max_out)),
        "lift": (lift, rin >= LIFT_FLOOR),
        "window": (prec_w, st["hit_window"] >= MIN_HITS),
        "token": (prec_t, st["hit_match"] >= MIN_HITS),
        "passage": (rec_p, (rec_p >= 0.2) & (prec_p >= 0.01)),
    }[rule]
    return score, ok & (st["fired"] > 0), figures


def ranked(scan, rule, cfg, t, only_ok=True, n=None):
    """The candidates of topic t by one rule, best first (n of them; all when n is None)."""
    out = []
    for s, st in scan.counts.items():
        score, ok, figs = rule_scores(rule, st, cfg)
        sc = score[t].where(ok[t], torch.tensor(-float("inf"), dtype=score.dtype)) if only_ok else score[t]
        top = torch.topk(sc, min(n or len(sc), len(sc)))
        for v, c in zip(top.values.tolist(), top.indices.tolist()):
            if v > -float("inf"):
                C = scan.num_codes[s]
                out.append(Candidate(code_name(s, c, C), s, c // C, c % C, v,
                                     {k: round(f[t, c].item(), 4) for k, f in figs.items()}))
    out.sort(key=lambda r: (-r.score, r.address))
    return out if n is None else out[:n]


def forcing(codes, mode, k, positions=None):
    """[Candidate or (site, group, code)] -> [Intervention]: one slot each (one mode), or all k slots of its
    head each (all mode: k[site] copies)."""
    out = []
    for c in codes:
        site, group, code = (c.site, c.group, c.code) if isinstance(c, Candidate) else c
        out += [Intervention(site, group, code, positions=positions)] * (k[site] if mode == "all" else 1)
    return out


@torch.no_grad()
def continuation_ce(model, y, T0):
    """y (B, T0 + new) prompts and their continuations -> (B,) summed cross-entropy (nats) of the tokens at
    positions T0 and after, under the model with no interventions. Causal: one forward scores them all."""
    logits = model(y[:, :-1])[0][:, T0 - 1:]  # (B, new, V): the predictions of y[:, T0:]
    return F.cross_entropy(logits.transpose(1, 2).float(), y[:, T0:], reduction="none").sum(1)


def random_control(chosen, fired, num_codes, rng, near=3):
    """For each chosen code, a random other code of its head with about its firing count: one of the `near`
    nearest on each side in the head's order by firings (fired: {site: (G*C,)}), none chosen twice."""
    taken = {(c.site, c.group, c.code) for c in chosen}
    out = []
    for c in chosen:
        C = num_codes[c.site]
        counts = fired[c.site][c.group * C:(c.group + 1) * C]
        order = torch.argsort(counts, stable=True).tolist()
        i = order.index(c.code)
        pool = [j for j in order[max(0, i - near):i + near + 1] if (c.site, c.group, j) not in taken]
        if pool:
            j = rng.choice(pool)
            taken.add((c.site, c.group, j))
            out.append((c.site, c.group, j))
    return out


# -----------------------------------------------------------------------------
# a topic's codes: forced on the probe passages, kept while they steer at little cost


class Probe:
    """What forcing codes does on the probe passages: the topics' next-token probability and the cost."""

    @torch.no_grad()
    def __init__(self, model, tokens, topic_tokens, batch_size):
        """tokens (N, T) the probe passages; topic_tokens (K, V) bool: the vocabulary entries each topic's
        regex matches."""
        self.model, self.dev, self.batch = model, next(model.parameters()).device, tokens.split(batch_size)
        self.mask = topic_tokens.float().to(self.dev)
        self.logp = [F.log_softmax(model(x.to(self.dev))[0].float(), -1) for x in self.batch]  # unforced
        self.entropy = torch.cat([-(lp.exp() * lp).sum(-1).reshape(-1) for lp in self.logp]).mean().item()
        self.base = self.measure([])[0]

    @torch.no_grad()
    def measure(self, interventions):
        """-> (topic probability (K,), the mean over positions; estimated CE ratio)."""
        prob, cross, n = 0.0, 0.0, 0
        for x, lp in zip(self.batch, self.logp):
            lq = F.log_softmax(self.model(x.to(self.dev), interventions=interventions)[0].float(), -1)
            q = lq.exp()
            prob = prob + (q @ self.mask.T).sum((0, 1))
            cross += -(q * lp).sum().item()
            n += x.numel()
        return (prob / n).cpu(), cross / n / self.entropy


def choose(probe, candidates, t, mode, k, cfg):
    """Codes for topic t in one mode, best candidate first, while the set's estimated CE ratio stays at
    most max_ce_ratio (and, for the effect rule, the topic's probability rises) -> (chosen, estimate,
    the first rejection's figures)."""
    cap = {s: 1 if mode == "all" else min(v, cfg.per_head or v) for s, v in k.items()}
    chosen, used, est, rejected = [], collections.Counter(), (probe.base[t].item(), 1.0), None
    for c in candidates[:3 * cfg.max_codes]:
        if len(chosen) == cfg.max_codes:
            break
        if used[(c.site, c.group)] >= cap[c.site]:
            continue
        prob, ratio = probe.measure(forcing(chosen + [c], mode, k))
        if ratio <= cfg.max_ce_ratio and (cfg.rule != "effect" or prob[t].item() > est[0]):
            chosen.append(c)
            used[(c.site, c.group)] += 1
            est = (prob[t].item(), ratio)
        elif rejected is None:
            rejected = (c, prob[t].item(), ratio)
    return chosen, est, rejected


def by_effect(probe, scan, t, mode, k, cfg):
    """The effect rule: candidates of the window and lift rules, each forced alone, by the topic's probability
    (only those that raise it)."""
    half = max(1, cfg.candidates // 2)
    pool = {c.address: c for c in ranked(scan, "window", cfg, t, n=half) + ranked(scan, "lift", cfg, t, n=half)}
    out = []
    for c in pool.values():
        prob, ratio = probe.measure(forcing([c], mode, k))
        gain = prob[t].item() / max(probe.base[t].item(), 1e-12)
        out.append(c._replace(score=gain, figures={**c.figures, "gain": round(gain, 3), "est_ce_ratio": round(ratio, 3)}))
    out.sort(key=lambda r: (-r.score, r.address))
    return [c for c in out if c.score > 1]


def why_none(scan, cfg, t, rejected):
    """One line: why topic t got no code in this mode, with the best candidate's figures."""
    if rejected is not None:
        c, prob, ratio = rejected
        return (f"its best candidate {c.address} ({cfg.rule} {c.score:.3g}) "
                + (f"puts the estimated CE ratio at {ratio:.2f}x > max_ce_ratio {cfg.max_ce_ratio}" if ratio > cfg.max_ce_ratio
                   else f"does not raise the topic's tokens ({prob:.2e} per position)"))
    if cfg.rule == "effect":
        return "no candidate of the window or lift rules raised the topic's token probability when forced"
    best = ranked(scan, cfg.rule, cfg, t, only_ok=False, n=1)
    if not best:
        return "no code fires on the scanned passages"
    figs = ", ".join(f"{k} {v:.3g}" for k, v in best[0].figures.items())
    return f"no code passes the {cfg.rule} rule's filter; the best, {best[0].address}: {figs}"


# -----------------------------------------------------------------------------
# sampling with codes forced, and what it costs


@torch.no_grad()
def sample(model, cfg, prompts, ivs_of, samples, decode_text):
    """Generate `samples` continuations of each prompt (token lists), with the interventions ivs_of(T0) (T0:
    the prompt's length) -> dict(texts, ce (nats per generated token), rep (repeated 3-grams, per text))."""
    dev, new = next(model.parameters()).device, cfg.max_new_tokens
    texts, ce_sum, reps, n_tokens = [], 0.0, [], 0
    for j, p in enumerate(prompts):
        T0 = len(p)
        gen = torch.Generator(device=dev).manual_seed(cfg.seed + j)  # the same draws in every condition
        y = model.generate(torch.tensor([p] * samples, device=dev), new, cfg.temperature, None, ivs_of(T0), gen)
        ce_sum += continuation_ce(model, y, T0).sum().item()
        n_tokens += y[:, T0:].numel()
        rows = y.cpu().tolist()
        reps += [repeated_ngrams(r[T0:]) for r in rows]
        texts += [decode_text(r[1:]) for r in rows]
    return dict(texts=texts, ce=ce_sum / n_tokens, rep=sum(reps) / len(reps))


def steered(model, cfg, prompts, codes, mode, k, at, samples, decode_text):
    """sample() with codes forced in a mode at `at` (all positions, or the generated tokens)."""
    def ivs_of(T0):
        return forcing(codes, mode, k, None if at == "all" else tuple(range(T0, T0 + cfg.max_new_tokens)))
    return sample(model, cfg, prompts, ivs_of, samples, decode_text)


def mean_of(out, key):
    return sum(v[key] for v in out.values()) / len(out)


def cap_per_head(cands, k, per_head, n):
    """The first n candidates with at most per_head (0: k) in one head."""
    out, used = [], collections.Counter()
    for c in cands:
        if len(out) < n and used[(c.site, c.group)] < min(k[c.site], per_head or k[c.site]):
            out.append(c)
            used[(c.site, c.group)] += 1
    return out


def run_sweep(model, cfg, sweep, caps, patterns, cands, k, prompts, decode_text):
    """Mean success and fluency per (cap per head, number of codes, place), one mode, sweep_samples per prompt."""
    base = sample(model, cfg, prompts, lambda T0: [], cfg.sweep_samples, decode_text)
    unsteered = sum(mention_rate(base["texts"], patterns[t]) for t in cands) / len(cands)
    table = [dict(per_head=0, n_codes=0, at="-", steered=unsteered, steered_ce=base["ce"], ce_ratio=1.0,
                  steered_rep=base["rep"])]
    cells = [(cap, n, at) for cap in caps for n in sweep for at in cfg.sweep_at.split(",")]
    bar = Progress(len(cells) * len(cands), "sweep")
    for cap, n, at in cells:
        per = {}
        for t, c in cands.items():
            pick = cap_per_head(c, k, cap, n)
            got = steered(model, cfg, prompts, pick, "one", k, at, cfg.sweep_samples, decode_text)
            per[t] = dict(steered=mention_rate(got["texts"], patterns[t]), ce=got["ce"], rep=got["rep"],
                          n_codes=len(pick))
            bar.update()
        table.append(dict(per_head=cap, n_codes=n, at=at, steered=mean_of(per, "steered"),
                          steered_ce=mean_of(per, "ce"), ce_ratio=mean_of(per, "ce") / base["ce"],
                          steered_rep=mean_of(per, "rep"), codes_used=mean_of(per, "n_codes"),
                          per_topic={t: v["steered"] for t, v in per.items()}))
        bar.write(f"{n} codes (at most {cap or 'k'} per head) at {at}: steered {table[-1]['steered']:.3f}, "
                  f"CE {table[-1]['steered_ce']:.3f} ({table[-1]['ce_ratio']:.2f}x)")
    bar.close()
    print(f"sweep ({len(prompts)} prompts x {cfg.sweep_samples} samples per topic and cell; "
          f"unsteered CE {base['ce']:.3f} nats/token; per head 0 = k):")
    print(f"{'per head':>8s} {'codes':>5s} {'at':>4s} {'steered':>8s} {'steered_ce':>10s} {'ce_ratio':>8s} {'rep3':>6s}")
    for r in table:
        print(f"{r['per_head']:8d} {r['n_codes']:5d} {r['at']:>4s} {r['steered']:8.3f} {r['steered_ce']:10.3f} "
              f"{r['ce_ratio']:8.2f} {r['steered_rep']:6.3f}")
    return table


def pick_codes(model, cfg, scan, modes, decode_tokens):
    """-> ({topic: {mode: (chosen, estimate, why_none or None)}}, {topic: the rule's one-mode order})."""
    cbs = model.codebooks()
    k = {s: cb.k for s, cb in cbs.items()}
    vocab = topic_vocabulary(scan.patterns, scan.names, model.config.vocab_size, decode_tokens)
    probe = Probe(model, scan.probe, vocab, cfg.batch_size)
    picks, orders = {}, {}
    bar = Progress(len(scan.names) * len(modes), "codes")
    for t, name in enumerate(scan.names):
        picks[name] = {}
        for mode in modes:
            cands = by_effect(probe, scan, t, mode, k, cfg) if cfg.rule == "effect" else ranked(scan, cfg.rule, cfg, t)
            orders.setdefault(name, cands)
            chosen, est, rejected = choose(probe, cands, t, mode, k, cfg)
            picks[name][mode] = (chosen, est, None if chosen else why_none(scan, cfg, t, rejected))
            bar.update()
    bar.close()
    return picks, orders, k, probe


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, _ = parse_args(argv, TopicsConfig, PRESETS, doc=__doc__)
    modes, sweep, caps = check(cfg)
    ckpt, model = load_codebook_model(cfg.ckpt, cfg.device)
    if ckpt.get("kind") != "lm":
        fail(f"topics needs a language-model checkpoint (kind='lm'); this one has kind={ckpt.get('kind')!r}")
    t0 = time.time()
    encode, decode_tokens, _ = tokenizer(ckpt)
    enc = tinystories_data.make_encoding(ckpt["data"]["meta"]["encoding"])
    prompts = encode_prompts(cfg, encode, model.config.block_size)
    scan = scan_passages(model, cfg, ckpt, decode_tokens)
    picks, orders, k, probe = pick_codes(model, cfg, scan, modes, decode_tokens)
    names, patterns = scan.names, scan.patterns
    base = sample(model, cfg, prompts, lambda T0: [], cfg.samples, enc.decode)
    rng = random.Random(cfg.seed)
    fired = {s: st["fired"] for s, st in scan.counts.items()}
    out, texts = {}, {m: {} for m in modes}
    bar = Progress(len(names) * len(modes), "topics")
    for t, n in enumerate(names):
        out[n] = dict(pattern=patterns[n], base_rate=scan.base_rate[t], baseline=mention_rate(base["texts"], patterns[n]),
                      baseline_ce=base["ce"], baseline_rep=base["rep"])
        for mode in modes:
            chosen, est, why = picks[n][mode]
            got = steered(model, cfg, prompts, chosen, mode, k, cfg.at, cfg.samples, enc.decode) if chosen else base
            texts[mode][n] = got["texts"]
            r = dict(steered=mention_rate(got["texts"], patterns[n]), steered_ce=got["ce"], ce_ratio=got["ce"] / base["ce"],
                     steered_rep=got["rep"], n_codes=len(chosen), n_forced=len(forcing(chosen, mode, k)),
                     codes=[c.address for c in chosen], figures=[c.figures for c in chosen],
                     est_topic_prob=[probe.base[t].item(), est[0]], est_ce_ratio=est[1], why_none=why,
                     sample=got["texts"][-1][:400])
            if cfg.controls and chosen:
                rand = random_control(chosen, fired, scan.num_codes, rng)
                got_r = steered(model, cfg, prompts, rand, mode, k, cfg.at, cfg.samples, enc.decode)
                r["random"] = dict(steered=mention_rate(got_r["texts"], patterns[n]), ce_ratio=got_r["ce"] / base["ce"],
                                   codes=[code_name(s, g * scan.num_codes[s] + c, scan.num_codes[s]) for s, g, c in rand])
            out[n][mode] = r
            if why:
                bar.write(f"warning: {n} ({mode} mode): no code: {why}")
            else:
                ctl = f", random {r['random']['steered']:.3f}" if "random" in r else ""
                bar.write(f"{n:10s} {mode}: baseline {out[n]['baseline']:.3f} steered {r['steered']:.3f}{ctl}, CE "
                          f"{r['ce_ratio']:.2f}x (estimated {est[1]:.2f}x), rep3 {base['rep']:.3f} -> {r['steered_rep']:.3f}"
                          f" ({len(chosen)} codes: {' '.join(r['codes'][:4])}{' ...' if len(chosen) > 4 else ''})")
            bar.update()
    bar.close()
    out["mean"], out["matrix"] = {}, {}
    topics_ = {n: out[n] for n in names}
    for mode in modes:
        rows = {n: v[mode] for n, v in topics_.items()}
        m = dict(baseline=mean_of(topics_, "baseline"), steered=mean_of(rows, "steered"),
                 baseline_ce=base["ce"], steered_ce=mean_of(rows, "steered_ce"), n_codes=mean_of(rows, "n_codes"),
                 topics_with_codes=sum(bool(r["n_codes"]) for r in rows.values()))
        m["ce_ratio"] = m["steered_ce"] / m["baseline_ce"]
        with_codes = [r for r in rows.values() if "random" in r]
        if with_codes:
            m["random_steered"] = sum(r["random"]["steered"] for r in with_codes) / len(with_codes)
            m["steered_where_random"] = sum(r["steered"] for r in with_codes) / len(with_codes)
        out["mean"][mode] = m
        out["matrix"][mode] = {a: {b: mention_rate(texts[mode][a], patterns[b]) for b in names} for a in names}
        ctl = (f"; random codes {m['random_steered']:.3f} (steered {m['steered_where_random']:.3f} on the same topics)"
               if "random_steered" in m else "")
        print(f"{mode} mode, mean over {len(names)} topics: baseline {m['baseline']:.3f}, steered {m['steered']:.3f}"
              f"{ctl}; CE {m['baseline_ce']:.3f} -> {m['steered_ce']:.3f} nats/token ({m['ce_ratio']:.2f}x), "
              f"{m['n_codes']:.1f} codes, {m['topics_with_codes']}/{len(names)} topics with codes")
    best = max(modes, key=lambda md: (out["mean"][md]["ce_ratio"] <= 1.5, out["mean"][md]["steered"]))
    out["mean"]["best_mode"] = best
    w = max(map(len, names))
    print(f"topic x topic ({best} mode): row = the topic steered to, column = the regex scored")
    print(" " * w + " " + " ".join(f"{b[:6]:>6s}" for b in names))
    for a in names:
        print(f"{a:{w}s} " + " ".join(f"{out['matrix'][best][a][b]:6.2f}" for b in names))
    print(f"({cfg.rule} rule, {len(prompts)} prompts x {cfg.samples} samples, {cfg.max_new_tokens} new tokens, at "
          f"{cfg.at}, {time.time() - t0:.0f} s)")
    if sweep:
        out["sweep"] = run_sweep(model, cfg, sweep, caps, patterns, orders, k, prompts, enc.decode)
    out["settings"] = dict(asdict(cfg), device=str(next(model.parameters()).device),
                           prompts=cfg.prompts.split("|"), n_passages=scan.n_passages, probe_passages=len(scan.probe),
                           labels=scan.labelled, baseline_sample=base["texts"][-1][:400], wall_s=time.time() - t0)
    write_json(cfg.ckpt, "topics.json", out)
    if not any(out[n][mode]["n_codes"] for n in names for mode in modes):
        fail(f"no topic got a code ({cfg.rule} rule, modes {cfg.mode}): see the warnings above; topics.json "
             f"records why for each")
    return out


if __name__ == "__main__":
    main()
