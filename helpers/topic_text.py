"""
The text side of topic steering, for topics.py: the topics (a regex each), the passages codes are picked on
and what fires in them, the prompts, and how a text is scored. topics.py holds the method: which codes, forced
how, at what cost. The corpora and their built-in topics are tinystories_data.py's.

    from helpers.topic_text import encode_prompts, scan_passages, topic_vocabulary, mention_rate, repeated_ngrams
    prompts = encode_prompts(cfg, encode, model.config.block_size)  # token lists, each after EOT
    scan = scan_passages(model, cfg, ckpt, decode_tokens)  # Scan: topics, codes' counts per site, probe passages
    vocab = topic_vocabulary(scan.patterns, scan.names, model.config.vocab_size, decode_tokens)  # (K, V) bool
    mention_rate(texts, r"\\bdragons?\\b")  # the share of texts that mention the topic
    repeated_ngrams(ids)                   # the share of a generation's 3-grams seen before in it

cfg is topics.py's TopicsConfig (its fields topics, data_dir, split, n_stories, batch_size, window,
probe_passages, probe_tokens, prompts and max_new_tokens are read here).

Topics. --topics: name=regex or a built-in name (tinystories_data.TOPICS), comma separated; without it the
data's own (meta.json's topics and patterns), else the paper's seven.

Passages. A passage is the text between two EOT tokens of the data's validation split (--split); the
model reads its first block_size - 1 tokens, and its topic is the regex's match on the lowercased text
of those tokens (a mention past the window does not count), or labels.npz where the data has one (the
synthetic corpus). Three quarters of the passages are scanned for statistics, the other quarter probes:
forcing is measured there. The scored generations come from the prompts, never from these passages.
"""

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

import tinystories_data
from helpers.common import Progress, fail
from helpers.readout import flat_ids, regex_labels


# -----------------------------------------------------------------------------
# the counts: pure functions


def topic_rates(ids, member, num_codes):
    """ids (P, n) codes firing at P tokens (unique per row), member (P, K) whether each token's passage
    is about topic K -> in_rate (K, num_codes): fraction of the topic's tokens where the code fires;
    out_rate (K, num_codes): the same over all other tokens."""
    member = member.bool()
    return in_out(dict(fired=torch.bincount(ids.reshape(-1), minlength=num_codes).double(),
                       n=torch.tensor(float(len(ids))), fired_in=hits(ids, member, num_codes),
                       n_in=member.sum(0).double()[:, None]))


def in_out(st):
    """A site's counts -> (in_rate, out_rate) (K, C), as topic_rates describes them."""
    return (st["fired_in"] / st["n_in"].clamp_min(1),
            (st["fired"] - st["fired_in"]) / (st["n"] - st["n_in"]).clamp_min(1))


def hits(ids, mask, num_codes):
    """ids (P, n), mask (P, K) -> (K, num_codes): how often each code fires at the tokens of each column."""
    return torch.stack([torch.bincount(ids[m].reshape(-1), minlength=num_codes) for m in mask.T]).double()


def passage_counts(ids, passage, member_p, num_codes):
    """ids (P, n), passage (P,) each token's passage, member_p (N, K) each passage's topics -> (in (K, C):
    topic passages where the code fires at least once, all (C,): passages where it fires)."""
    pairs = torch.unique(passage[:, None] * num_codes + ids)  # (passage, code) pairs, each once
    p, c = pairs // num_codes, pairs % num_codes
    every = torch.bincount(c, minlength=num_codes).double()
    inside = torch.stack([torch.bincount(c[m[p]], minlength=num_codes) for m in member_p.T]).double()
    return inside, every


def window_before(match, w):
    """match (T, K) bool, the tokens where a regex match ends in one passage -> (T, K): the tokens up to w
    before such a token (the positions whose next few predictions include the topic's word)."""
    out = torch.zeros_like(match)
    for d in range(1, w + 1):
        out[:-d] |= match[d:]
    return out


# -----------------------------------------------------------------------------
# the topics, and the passages: what fires where each topic is mentioned


def topic_patterns(cfg, meta, labels):
    """-> (topic names, {name: regex}, labels or None when passages are labelled by the regexes)."""
    if cfg.topics:  # name=pattern or a built-in name, comma separated; passages labelled by the pattern
        patterns = {}
        for item in cfg.topics.split(","):
            name, _, pat = item.partition("=")
            if not pat and name not in tinystories_data.TOPICS:
                fail(f"--topics: {name!r} has no pattern; built in: {', '.join(tinystories_data.TOPICS)}")
            try:
                re.compile(pat or tinystories_data.TOPICS[name])
            except re.error as e:
                fail(f"--topics: {name}={pat}: not a regex ({e})")
            patterns[name] = pat or tinystories_data.TOPICS[name]
        return list(patterns), patterns, None
    patterns = meta.get("patterns") or tinystories_data.TOPICS
    if labels is None:
        patterns = {t: patterns[t] for t in meta.get("topics", patterns)}
        return list(patterns), patterns, None
    return list(meta["topics"]), patterns, labels


def topic_vocabulary(patterns, names, n_vocab, decode_tokens):
    """(K, V) bool: tokens whose lowercased text alone matches the topic's regex (e.g. ' sword')."""
    pieces = [p.lower() for p in decode_tokens(list(range(n_vocab)))]
    return torch.tensor([[bool(re.search(patterns[n], p)) for p in pieces] for n in names])



@dataclass
class Scan:
    names: list  # topics
    patterns: dict  # topic -> regex
    labelled: str  # how passages got their topics: labels.npz or regex
    counts: dict  # site -> {fired (C,), n, fired_in (K, C), n_in (K, 1), hit_window, hit_match, pass_in,
    #                        pass_all, n_pass_in}: C is the site's groups x codes
    num_codes: dict  # site -> codes per group
    base_rate: list  # per topic: the share of scanned passages that mention it
    n_passages: int  # scanned
    probe: torch.Tensor  # (N, T) the probe passages' tokens (EOT first)


@torch.no_grad()
def scan_passages(model, cfg, ckpt, decode_tokens):
    """Read the passages of the split -> Scan: per site and topic, where each code fires."""
    meta = ckpt["data"]["meta"]
    data_dir = cfg.data_dir or ckpt["data"]["data_dir"]
    path = os.path.join(data_dir, f"{cfg.split}.bin")
    if not os.path.exists(path):
        fail(f"no {path}: pass --data_dir= (the data the checkpoint was trained on)")
    tokens = torch.from_numpy(np.memmap(path, dtype=np.uint16, mode="r").astype(np.int64))
    eots = (tokens == meta["eot"]).nonzero().squeeze(1).tolist() + [len(tokens)]
    spans = [(i, a + 1, b) for i, (a, b) in enumerate(zip(eots, eots[1:])) if b > a + 1]  # (index, first, end)
    if len(spans) > cfg.n_stories:  # evenly spaced: a book's passages in order would favour its first part
        spans = [spans[int(j)] for j in np.linspace(0, len(spans) - 1, cfg.n_stories)]
    if len(spans) < 8:
        fail(f"{path}: {len(spans)} passages between EOT tokens; topics needs at least 8")
    labels_path = os.path.join(data_dir, "labels.npz")
    labels = None
    if cfg.split == "val" and os.path.exists(labels_path):
        labels = np.load(labels_path)["val_topic"]
    names, patterns, labels = topic_patterns(cfg, meta, labels)
    rx = [re.compile(patterns[n]) for n in names]
    probe_spans = spans[3::4]  # a quarter probes how forcing acts; the rest is scanned
    spans = [sp for j, sp in enumerate(spans) if j % 4 != 3]
    if len(probe_spans) > cfg.probe_passages:
        probe_spans = [probe_spans[int(j)] for j in np.linspace(0, len(probe_spans) - 1, cfg.probe_passages)]
    L, cbs, K = model.config.block_size, model.codebooks(), len(names)
    dev = next(model.parameters()).device
    ids_all, member_all, match_all, window_all, passage_all = {s: [] for s in cbs}, [], [], [], []
    member_p = torch.zeros(len(spans), K, dtype=torch.bool)
    B = cfg.batch_size
    bar = Progress((len(spans) + B - 1) // B, "passages")
    for b0 in range(0, len(spans), B):
        batch = spans[b0:b0 + B]
        x = torch.full((len(batch), L), meta["eot"], dtype=torch.long)  # EOT, then the passage's first L-1 tokens
        valid = torch.zeros(len(batch), L, dtype=torch.bool)
        match = torch.zeros(len(batch), L, K, dtype=torch.bool)
        for i, (index, a, e) in enumerate(batch):
            toks = tokens[a:min(e, a + L - 1)]
            x[i, 1:1 + len(toks)] = toks
            valid[i, 1:1 + len(toks)] = True
            pieces = [p.lower() for p in decode_tokens(toks.tolist())]  # what the model read, and only that
            for ti, r in enumerate(rx):
                match[i, 1:1 + len(toks), ti] = regex_labels(toks[None], lambda _: pieces, r) == 0
            if labels is not None:
                t = int(labels[index])
                member_p[b0 + i, t] = t >= 0
            else:
                member_p[b0 + i] = match[i].any(0)
        _, _, codes, _ = model(x.to(dev))
        for s, c in codes.items():
            ids_all[s].append(flat_ids(c.cpu(), cbs[s].num_codes)[valid.reshape(-1)])
        member_all.append(member_p[b0:b0 + len(batch), None, :].expand(-1, L, -1)[valid])
        match_all.append(match[valid])
        window_all.append(torch.stack([window_before(m, cfg.window) for m in match])[valid])
        passage_all.append(torch.arange(b0, b0 + len(batch))[:, None].expand(-1, L)[valid])
        bar.update()
    bar.close()
    member, match, window, passage = (torch.cat(v) for v in (member_all, match_all, window_all, passage_all))
    counts = {}
    for s, cb in cbs.items():
        ids, C = torch.cat(ids_all[s]), cb.groups * cb.num_codes
        pass_in, pass_all = passage_counts(ids, passage, member_p, C)
        counts[s] = dict(fired=torch.bincount(ids.reshape(-1), minlength=C).double(), n=torch.tensor(float(len(ids))),
                         fired_in=hits(ids, member, C), n_in=member.sum(0).double()[:, None],
                         hit_window=hits(ids, window, C), hit_match=hits(ids, match, C), pass_in=pass_in,
                         pass_all=pass_all, n_pass_in=member_p.sum(0).double()[:, None])
    T = min(cfg.probe_tokens, L)
    probe = torch.full((len(probe_spans), T), meta["eot"], dtype=torch.long)
    for i, (_, a, e) in enumerate(probe_spans):
        toks = tokens[a:min(e, a + T - 1)]
        probe[i, 1:1 + len(toks)] = toks  # a short passage ends in EOTs: they are read as any token
    base_rate = member_p.double().mean(0).tolist()
    return Scan(names, patterns, "labels.npz" if labels is not None else "regex", counts,
                {s: cb.num_codes for s, cb in cbs.items()}, base_rate, len(spans), probe)


# -----------------------------------------------------------------------------
# the prompts, and the text of a generation


def encode_prompts(cfg, encode, block_size):
    """cfg.prompts, '|'-separated -> token lists, each after EOT; a one-line error for a prompt that does not
    fit block_size with max_new_tokens new tokens (generation has no sliding window)."""
    prompts = [encode(p) for p in cfg.prompts.split("|")]
    for p, text in zip(prompts, cfg.prompts.split("|")):
        if len(p) + cfg.max_new_tokens - 1 > block_size:
            fail(f"prompt {text!r} ({len(p)} tokens with EOT) + {cfg.max_new_tokens} new tokens exceed block_size "
                 f"{block_size}: lower --max_new_tokens")
    return prompts


def mention_rate(texts, pattern):
    """Fraction of texts whose lowercased text matches the regex pattern."""
    rx = re.compile(pattern)
    return sum(bool(rx.search(t.lower())) for t in texts) / max(1, len(texts))


def repeated_ngrams(ids, n=3):
    """Fraction of the n-grams of ids (a list) that already occurred earlier in it (0 when it has none)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
