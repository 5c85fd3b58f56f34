"""
Steer a language model's stories to a topic by forcing codes (SPEC section 3, the paper's Table 3b), and
measure what the steering costs in fluency. On a checkpoint of train.py trained on token data:

    python topics.py --ckpt=out-stories-ft/ckpt.pt                 # the paper's protocol, 7 topics
    python topics.py --ckpt=out-stories-ft/ckpt.pt --sweep=1,2,4,8,14,16 --sweep_per_head=8,4
    python topics.py --ckpt=out-stories-ft/ckpt.pt --max_codes=16 --per_head=0   # the paper's choice of codes
    python topics.py --ckpt=out-stories-ft/ckpt.pt --topics=dragon,castle=castle --at=new

The second adds a sweep: success and fluency per cap per head, number of codes and place (a cheaper
3 samples per prompt; about 30 min on a 2-core CPU).

Flags are --key=value (the config block below; `--help` prints them). Writes topics.json next to the
checkpoint; errors are one line on stderr, exit status 2.

Topic codes. A story is the text between two EOT tokens of the validation data; its topic comes from
labels.npz when the data has one (the synthetic corpus), else from the topic's regex over its lowercased
text (--topics, or the data's patterns, or the paper's seven). Over story tokens (not the EOT), for each
topic and code: in = the fraction of the topic's story tokens where the code fires, out = the same over
all other story tokens. Topic codes: in >= min_in and out <= max_out, best in - out first, at most
per_head in one head (0: k) and max_codes in all.

Steering. The topic codes are forced (codes of one head take the slots k-1, k-2, ...) at every position
(--at=all, the paper's way) or at the generated tokens only (--at=new), while sampling `samples`
continuations of each prompt (after EOT; temperature 1, no top-k; the same random draws in every
condition, so only the codes differ). Prompt + new tokens must fit block_size (no sliding window).
  baseline, steered   fraction of generations whose lowercased text matches the topic's regex, unsteered
                      and steered;
  baseline_ce,        fluency: the mean cross-entropy (nats per token) of the generated tokens under the
  steered_ce          same model with no interventions, i.e. how surprising the text is to the model
                      that was not steered (the unsteered samples' own: about the model's entropy);
  baseline_rep,       the fraction of repeated 3-grams: per generation, the share of its 3-grams of
  steered_rep         generated tokens that already occurred earlier in it, averaged over generations.
topics.json: topic -> {baseline, steered, baseline_ce, steered_ce, baseline_rep, steered_rep, n_codes,
codes, pattern, code_rates, sample}, "mean" (the same averaged over topics, plus ce_ratio = steered_ce /
baseline_ce), "settings", and with --sweep a "sweep" table: per (per_head, number of codes, place), the
mean steered rate, steered_ce, ce_ratio and steered_rep (sweep_samples per prompt; its own unsteered
samples first, whose "steered" is the mean baseline rate).
"""

import cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

import tinystories_data
from codebook import Intervention
from common import Progress, fail, parse_args
from readout import code_name, flat_ids, load_codebook_model, tokenizer, write_json


@dataclass
class TopicsConfig:
    ckpt: str = ""  # a checkpoint of train.py on token data, with codebooks (required)
    device: str = "auto"  # auto (cuda if there is one, else mps, else cpu), cpu, cuda or mps
    seed: int = 0  # seed of the samples (prompt j draws from seed + j)
    batch_size: int = 100  # stories per forward pass while finding topic codes
    data_dir: str = ""  # the token data ("": the one the checkpoint was trained on)
    topics: str = ""  # name or name=regex, comma separated ("": the data's topics, else the paper's seven)
    n_stories: int = 1000  # validation stories scanned for topic codes
    min_in: float = 0.1  # a topic code fires on at least this fraction of the topic's story tokens
    max_out: float = 0.01  # and on at most this fraction of the other story tokens
    max_codes: int = 14  # codes forced per topic (the paper: 8 to 16)
    per_head: int = 4  # at most this many in one head (0: k); a head with all k slots forced stops reading
    # its input, and the stories stop being stories (the sweep in the README: per_head=k, 16 codes)
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
    for key in ("batch_size", "n_stories", "max_codes", "samples", "max_new_tokens", "sweep_samples"):
        if getattr(cfg, key) < 1:
            fail(f"--{key}={getattr(cfg, key)}: must be >= 1")
    if cfg.per_head < 0:
        fail(f"--per_head={cfg.per_head}: must be >= 0")
    if cfg.temperature <= 0:
        fail(f"--temperature={cfg.temperature}: must be > 0")
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
    return lists


# -----------------------------------------------------------------------------
# the measures: pure functions


def topic_rates(ids, member, num_codes):
    """ids (P, n) codes firing at P story tokens (unique per row), member (P, K) whether each token's story
    is about topic K -> in_rate (K, num_codes): fraction of the topic's tokens where the code fires;
    out_rate (K, num_codes): the same over all other story tokens."""
    member = member.bool()
    fired = torch.bincount(ids.reshape(-1), minlength=num_codes).double()  # (C,) firings over all tokens
    fired_in = torch.stack([torch.bincount(ids[m].reshape(-1), minlength=num_codes) for m in member.T]).double()
    n_in = member.sum(0).double()[:, None]  # (K, 1)
    return fired_in / n_in.clamp_min(1), (fired - fired_in) / (len(ids) - n_in).clamp_min(1)


def pick_topic_codes(rows, k, min_in, max_out, max_codes):
    """rows: [(address, site, group, code, in_rate, out_rate)] of one topic -> the codes to force, best first:
    in_rate >= min_in and out_rate <= max_out, by in_rate - out_rate, at most k per (site, group) (they
    take the slots k-1, k-2, ... of that group) and max_codes in all."""
    ok = sorted((r for r in rows if r[4] >= min_in and r[5] <= max_out), key=lambda r: (r[5] - r[4], r[0]))
    out, used = [], {}
    for r in ok:
        if len(out) < max_codes and used.get((r[1], r[2]), 0) < k[r[1]]:
            out.append(r)
            used[(r[1], r[2])] = used.get((r[1], r[2]), 0) + 1
    return out


def mention_rate(texts, pattern):
    """Fraction of texts whose lowercased text matches the regex pattern."""
    rx = re.compile(pattern)
    return sum(bool(rx.search(t.lower())) for t in texts) / max(1, len(texts))


def repeated_ngrams(ids, n=3):
    """Fraction of the n-grams of ids (a list) that already occurred earlier in it (0 when it has none)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


@torch.no_grad()
def continuation_ce(model, y, T0):
    """y (B, T0 + new) prompts and their continuations -> (B,) summed cross-entropy (nats) of the tokens at
    positions T0 and after, under the model with no interventions. Causal: one forward scores them all."""
    logits = model(y[:, :-1])[0][:, T0 - 1:]  # (B, new, V): the predictions of y[:, T0:]
    return F.cross_entropy(logits.transpose(1, 2).float(), y[:, T0:], reduction="none").sum(1)


# -----------------------------------------------------------------------------
# topic codes: which codes fire on a topic's stories and rarely elsewhere


def topic_patterns(cfg, meta, labels):
    """-> (topic names, {name: regex}, labels or None when stories are labelled by the regexes)."""
    if cfg.topics:  # name=pattern or a built-in name, comma separated; stories labelled by the pattern
        patterns = {}
        for item in cfg.topics.split(","):
            name, _, pat = item.partition("=")
            if not pat and name not in tinystories_data.TOPICS:
                fail(f"--topics: {name!r} has no pattern; built in: {', '.join(tinystories_data.TOPICS)}")
            patterns[name] = pat or tinystories_data.TOPICS[name]
        return list(patterns), patterns, None
    patterns = meta.get("patterns") or tinystories_data.TOPICS
    if labels is None:
        patterns = {t: patterns[t] for t in meta.get("topics", patterns)}
        return list(patterns), patterns, None
    return list(meta["topics"]), patterns, labels


@torch.no_grad()
def find_topic_codes(model, cfg, ckpt, decode_text):
    """Scan validation stories -> (names, patterns, {topic: [(address, site, group, code, in, out)]},
    how the stories were labelled, stories scanned)."""
    meta = ckpt["data"]["meta"]
    data_dir = cfg.data_dir or ckpt["data"]["data_dir"]
    path = os.path.join(data_dir, "val.bin")
    if not os.path.exists(path):
        fail(f"no {path}: pass --data_dir= (the data the checkpoint was trained on)")
    val = torch.from_numpy(np.memmap(path, dtype=np.uint16, mode="r").astype(np.int64))
    eots = (val == meta["eot"]).nonzero().squeeze(1).tolist() + [len(val)]
    spans = [(a + 1, b) for a, b in zip(eots, eots[1:]) if b > a + 1][:cfg.n_stories]  # story tokens
    labels_path = os.path.join(data_dir, "labels.npz")
    labels = np.load(labels_path)["val_topic"] if os.path.exists(labels_path) else None
    names, patterns, labels = topic_patterns(cfg, meta, labels)
    B, L, cbs = cfg.batch_size, model.config.block_size, model.codebooks()
    dev = next(model.parameters()).device
    ids_all, member_all = {s: [] for s in cbs}, []
    bar = Progress((len(spans) + B - 1) // B, "stories")
    for b0 in range(0, len(spans), B):
        batch = spans[b0:b0 + B]
        x = torch.full((len(batch), L), meta["eot"], dtype=torch.long)  # EOT, then the story's first L-1 tokens
        valid = torch.zeros(len(batch), L, dtype=torch.bool)
        member = torch.zeros(len(batch), len(names), dtype=torch.bool)
        for i, (a, e) in enumerate(batch):
            toks = val[a:min(e, a + L - 1)]
            x[i, 1:1 + len(toks)] = toks
            valid[i, 1:1 + len(toks)] = True
            if labels is not None:
                t = int(labels[b0 + i])
                member[i, t] = t >= 0
            else:
                text = decode_text(val[a:e].tolist()).lower()
                member[i] = torch.tensor([bool(re.search(patterns[n], text)) for n in names])
        _, _, codes, _ = model(x.to(dev))
        for s, c in codes.items():
            ids_all[s].append(flat_ids(c.cpu(), cbs[s].num_codes)[valid.reshape(-1)])
        member_all.append(member[:, None, :].expand(-1, L, -1)[valid])
        bar.update()
    bar.close()
    member = torch.cat(member_all)  # (P, K)
    rows = {n: [] for n in names}
    for s, cb in cbs.items():
        rin, rout = topic_rates(torch.cat(ids_all[s]), member, cb.groups * cb.num_codes)
        for ti, n in enumerate(names):
            cand = (rin[ti] >= cfg.min_in).nonzero().squeeze(1).tolist()
            rows[n] += [(code_name(s, c, cb.num_codes), s, c // cb.num_codes, c % cb.num_codes,
                         rin[ti, c].item(), rout[ti, c].item()) for c in cand]
    return names, patterns, rows, "labels.npz" if labels is not None else "regex", len(spans)


# -----------------------------------------------------------------------------
# sampling with codes forced, and what it costs


@torch.no_grad()
def sample(model, cfg, prompts, codes, at, samples, decode_text):
    """Generate `samples` continuations of each prompt (token lists) with `codes` [(site, group, code)]
    forced at `at` -> dict(texts, ce (nats per generated token), rep (repeated 3-grams, mean per text))."""
    dev, new = next(model.parameters()).device, cfg.max_new_tokens
    texts, ce_sum, reps, n_tokens = [], 0.0, [], 0
    for j, p in enumerate(prompts):
        T0 = len(p)
        positions = None if at == "all" else tuple(range(T0, T0 + new))
        ivs = [Intervention(site, g, c, positions=positions) for site, g, c in codes]
        gen = torch.Generator(device=dev).manual_seed(cfg.seed + j)  # the same draws in every condition
        y = model.generate(torch.tensor([p] * samples, device=dev), new, cfg.temperature, None, ivs, gen)
        ce_sum += continuation_ce(model, y, T0).sum().item()
        n_tokens += y[:, T0:].numel()
        rows = y.cpu().tolist()
        reps += [repeated_ngrams(r[T0:]) for r in rows]
        texts += [decode_text(r[1:]) for r in rows]
    return dict(texts=texts, ce=ce_sum / n_tokens, rep=sum(reps) / len(reps))


def mean_of(out, key):
    return sum(v[key] for v in out.values()) / len(out)


def pick_all(model, rows, cfg, per_head, n):
    """{topic: its best n codes}, at most per_head in one head (0: k)."""
    k = {s: min(cb.k, per_head or cb.k) for s, cb in model.codebooks().items()}
    return {t: pick_topic_codes(r, k, cfg.min_in, cfg.max_out, n) for t, r in rows.items()}


def run_sweep(model, cfg, sweep, caps, patterns, rows, prompts, decode_text):
    """Mean success and fluency per (cap per head, number of codes, place), sweep_samples per prompt."""
    base = sample(model, cfg, prompts, [], "all", cfg.sweep_samples, decode_text)
    unsteered = sum(mention_rate(base["texts"], patterns[t]) for t in rows) / len(rows)
    table = [dict(per_head=0, n_codes=0, at="-", steered=unsteered, steered_ce=base["ce"], ce_ratio=1.0,
                  steered_rep=base["rep"])]
    cells = [(cap, n, at) for cap in caps for n in sweep for at in cfg.sweep_at.split(",")]
    picks = {cap: pick_all(model, rows, cfg, cap, max(sweep)) for cap in caps}  # n codes: the first n
    bar = Progress(len(cells) * len(rows), "sweep")
    for cap, n, at in cells:
        per = {}
        for t in rows:
            pick = picks[cap][t][:n]
            got = sample(model, cfg, prompts, [r[1:4] for r in pick], at, cfg.sweep_samples, decode_text)
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip() + "\n\nflags and defaults: " +
              " ".join(f"--{f.name}={f.default!r}" for f in fields(TopicsConfig)))
        sys.exit(0)
    cfg, _ = parse_args(argv, TopicsConfig, PRESETS)
    sweep, caps = check(cfg)
    ckpt, model = load_codebook_model(cfg.ckpt, cfg.device)
    if ckpt.get("kind") != "lm":
        fail(f"topics needs a language-model checkpoint (kind='lm'); this one has kind={ckpt.get('kind')!r}")
    t0 = time.time()
    encode = tokenizer(ckpt)[0]
    enc = tinystories_data.make_encoding(ckpt["data"]["meta"]["encoding"])
    prompts, L = [encode(p) for p in cfg.prompts.split("|")], model.config.block_size
    for p, text in zip(prompts, cfg.prompts.split("|")):
        if len(p) + cfg.max_new_tokens - 1 > L:
            fail(f"prompt {text!r} ({len(p)} tokens with EOT) + {cfg.max_new_tokens} new tokens exceed block_size "
                 f"{L}: lower --max_new_tokens")
    names, patterns, rows, labelled, n_stories = find_topic_codes(model, cfg, ckpt, enc.decode)
    picks = pick_all(model, rows, cfg, cfg.per_head, cfg.max_codes)
    base = sample(model, cfg, prompts, [], "all", cfg.samples, enc.decode)
    out = {}
    bar = Progress(len(names), "topics")
    for n in names:
        pick = picks[n]
        got = sample(model, cfg, prompts, [r[1:4] for r in pick], cfg.at, cfg.samples, enc.decode) if pick else base
        out[n] = dict(baseline=mention_rate(base["texts"], patterns[n]), steered=mention_rate(got["texts"], patterns[n]),
                      baseline_ce=base["ce"], steered_ce=got["ce"], baseline_rep=base["rep"], steered_rep=got["rep"],
                      n_codes=len(pick), codes=[r[0] for r in pick], pattern=patterns[n],
                      code_rates=[[round(r[4], 3), round(r[5], 4)] for r in pick], sample=got["texts"][-1][:400])
        bar.write(f"{n:10s} baseline {out[n]['baseline']:.3f} steered {out[n]['steered']:.3f}, CE {base['ce']:.3f} -> "
                  f"{got['ce']:.3f}, rep3 {base['rep']:.3f} -> {got['rep']:.3f} ({len(pick)} codes: "
                  f"{' '.join(out[n]['codes'][:4])}{' ...' if len(pick) > 4 else ''})")
        bar.update()
    bar.close()
    mean = {key: mean_of(out, key) for key in ("baseline", "steered", "baseline_ce", "steered_ce", "baseline_rep",
                                              "steered_rep", "n_codes")}
    mean["ce_ratio"] = mean["steered_ce"] / mean["baseline_ce"]
    print(f"mean over {len(out)} topics: baseline {mean['baseline']:.3f}, steered {mean['steered']:.3f}; CE "
          f"{mean['baseline_ce']:.3f} -> {mean['steered_ce']:.3f} nats/token ({mean['ce_ratio']:.2f}x), rep3 "
          f"{mean['baseline_rep']:.3f} -> {mean['steered_rep']:.3f} ({len(prompts)} prompts x {cfg.samples} samples, "
          f"{cfg.max_new_tokens} new tokens, {cfg.max_codes} codes, at most {cfg.per_head or 'k'} per head, at "
          f"{cfg.at}, {time.time() - t0:.0f} s)")
    out["mean"] = mean
    if sweep:
        out["sweep"] = run_sweep(model, cfg, sweep, caps, patterns, rows, prompts, enc.decode)
    out["settings"] = dict(asdict(cfg), device=str(next(model.parameters()).device),
                           prompts=cfg.prompts.split("|"), n_stories=n_stories, labels=labelled,
                           baseline_sample=base["texts"][-1][:400], wall_s=time.time() - t0)
    write_json(cfg.ckpt, "topics.json", out)
    return out


if __name__ == "__main__":
    main()
