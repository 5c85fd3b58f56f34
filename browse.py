"""
See what the codes mean: one command writes a self-contained HTML code browser beside the checkpoint.

    python browse.py --ckpt=out-fsm/ckpt.pt            # -> out-fsm/browse.html; open it in any browser
    python browse.py --ckpt=out-stories/ckpt.pt        # a language model: its val.bin, topics.json if there
    python browse.py --ckpt=out-fsm/ckpt.pt --n_seqs=100 --effect_codes=64   # caps for a big model

One HTML file: no server, no network (a Content-Security-Policy meta tag forbids every outside load), the
data embedded as one JSON block, drawn by a little plain JavaScript and inline SVG. The page, its CSS and its
script are browse_page.html beside this file, which this script fills in. Links: browse.html#L1.mlp:88 (a
code), #search=REGEX (regex search), #seq=3 (a sequence with the codes of each token), #fsm, #topics.

What the page holds (the same numbers as `steer.py usage / show / search` with the same --n_seqs and --seed):
  index      every codebook site: alive fraction, usage entropy, codes by firings; codes sortable by firings
  a code     top contexts by score, the token it fires on highlighted; a random sample of its firings;
             firings and density; a histogram of its scores; its k-slot counts; the tokens it fires on,
             before and after; the codes that fire with it at other sites (lift = P(both) / (P(a) P(b)));
             what forcing it at every position does to the next-token distribution (--effect_codes codes)
  search     codes ranked by F1 over the positions where a regex on the decoded text ends (the browser's
             regex dialect: the same as Python's for ordinary patterns), with a precision threshold
  TokFSM     the state table and Figures 6a / 4 from states.json and patch.json, where they exist
  LM         topics.json's topics; every sequence with each token's codes
Scores of single firings in the page are quantised to 65536 levels per site (the histogram and the samples);
the top contexts carry show's exact scores. The bytes depend only on the checkpoint, the flags and the
JSON files beside it.
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP reads its environment when torch loads it)

import base64
import hashlib
import html
import itertools
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from codebook import Intervention
from helpers.common import fail, parse_flags
from model import format_code, parse_code
from helpers.readout import (code_counts, code_scores, flat_ids, load_codebook_model, need_fsm, run, sample_sequences,
                     tokenizer, usage_stats)

FLAGS = dict(  # every flag and its default; the default's type is the flag's type
    ckpt="",  # a checkpoint written by train.py (required)
    device="auto",  # auto, cpu, cuda or mps
    seed=0,  # seed of the sampled FSM sequences (as steer.py's)
    n_seqs=200,  # sequences sampled (FSM) or windows of val.bin (language models): the page's data
    batch_size=100,  # sequences per forward pass
    top=8,  # top contexts kept per code
    context=24,  # tokens of context before the firing token
    effect_codes=128,  # codes whose forcing effect is precomputed: those in states.json / topics.json, the most frequent
    effect_seqs=2,  # sequences the forcing effect is measured on
    data_dir="",  # language models: the token data ("": the one the checkpoint was trained on)
    out="",  # the page ("": browse.html beside the checkpoint)
)


def parse_args(argv):
    """['--ckpt=x.pt', '--top=5'] -> flags dict, checked."""
    cfg = {**FLAGS, **parse_flags(argv, FLAGS, __doc__)[0]}
    if not cfg["ckpt"]:
        fail("--ckpt=PATH is required")
    for key in ("n_seqs", "batch_size", "top", "effect_seqs"):
        if cfg[key] < 1:
            fail(f"--{key}={cfg[key]}: must be >= 1")
    if cfg["effect_codes"] < 0 or cfg["context"] < 0:
        fail("--effect_codes and --context must be >= 0")
    if cfg["device"] not in ("cpu", "cuda", "mps", "auto"):
        fail(f"--device={cfg['device']}: must be cpu, cuda, mps or auto")
    return cfg


# -----------------------------------------------------------------------------
# the data: what the page shows, computed once here


def sample_tokens(cfg, ckpt, model):
    """The sequences the page is about: (B, T) tokens, the same as steer.py's."""
    return sample_sequences(ckpt, cfg["n_seqs"], model.config.block_size, cfg["seed"], cfg["data_dir"])


def b64(a, dtype):
    """An array as base64 of its little-endian bytes: compact, and read in the page as a typed array."""
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def top_firings(flat, scores, num, top):
    """The best `top` firings of every code at once, as steer.py show ranks them (score descending, ties by
    position). flat (P, n) flat code ids, scores (P, n) -> {code: [pos, score, pos, score, ...]}."""
    P, n = flat.shape
    pos, flat, scores = torch.arange(P).repeat_interleave(n), flat.reshape(-1), scores.reshape(-1)
    o = scores.argsort(descending=True, stable=True)
    o = o[flat[o].argsort(stable=True)]  # by code, then score, then position
    count = torch.bincount(flat, minlength=num)
    rank = torch.arange(len(o)) - (count.cumsum(0) - count)[flat[o]]
    keep = o[rank < top]
    out = {}
    for c, p, s in zip(flat[keep].tolist(), pos[keep].tolist(), scores[keep].tolist()):
        out.setdefault(c, []).extend((p, round(s, 4)))
    return out


def site_data(site, cb, codes, acts, top):
    """One codebook site: usage (as steer.py usage), firings per code, the top contexts (as steer.py show),
    the selected codes at every position and their scores quantised to 16 bits."""
    n = code_counts(codes, cb)  # (G, C)
    scores = code_scores(cb, acts, codes)  # (P, G, k)
    flat = flat_ids(codes, cb.num_codes)  # (P, G*k)
    lo, hi = scores.min().item(), scores.max().item()
    q = ((scores - lo) / max(hi - lo, 1e-12) * 65535).round().clamp(0, 65535)
    wide = cb.groups * cb.num_codes > 65535
    return dict(name=site, groups=cb.groups, num_codes=cb.num_codes, k=cb.k, usage=usage_stats(n),
                firings=n.reshape(-1).long().tolist(), top=top_firings(flat, scores.reshape(flat.shape), n.numel(), top),
                score_lo=round(lo, 4), score_hi=round(hi, 4), width=4 if wide else 2,
                codes=b64(codes.reshape(-1).numpy(), "<u4" if wide else "<u2"), scores=b64(q.reshape(-1).numpy(), "<u2"))


@torch.no_grad()
def effect_picks(sites, named, cap):
    """Which codes get a precomputed forcing effect: those named in states.json / topics.json first, then the
    most frequent of each site in turn -> [(site, group, code)], at most cap."""
    picks = [parse_code(a) for a in named]
    ranked = [[(s["name"], c // s["num_codes"], c % s["num_codes"]) for c in
               torch.tensor(s["firings"]).argsort(descending=True, stable=True).tolist() if s["firings"][c] > 0]
              for s in sites]
    picks += [r for row in itertools.zip_longest(*ranked) for r in row if r is not None]
    return list(dict.fromkeys(picks))[:cap]


def forcing_effects(model, tokens, picks, cfg, decode):
    """Each picked code forced at every position of a few sequences: the mean change of each next token's
    probability -> {address: {"up": [[token, dp], ...], "down": [...]}}, the 5 most promoted and suppressed."""
    if not picks:
        return {}
    x = tokens[:cfg["effect_seqs"]].to(next(model.parameters()).device)
    base = F.softmax(model(x)[0].float(), -1)
    names, out = decode(list(range(model.config.vocab_size))), {}
    for i, (site, g, c) in enumerate(picks):
        dp = (F.softmax(model(x, interventions=[Intervention(site, g, c)])[0].float(), -1) - base)
        dp = dp.reshape(-1, dp.shape[-1]).mean(0).cpu()  # (V,)
        order = dp.argsort(descending=True, stable=True).tolist()
        out[format_code(site, g, c)] = dict(up=[[names[t], round(dp[t].item(), 5)] for t in order[:5]],
                                          down=[[names[t], round(dp[t].item(), 5)] for t in order[::-1][:5]])
        if i % 32 == 31:
            print(f"forcing effects: {i + 1}/{len(picks)}", flush=True)
    return out


def read_beside(ckpt_path, name):
    """A results file of steer.py or topics.py beside the checkpoint, or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), name)
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def page_data(cfg, ckpt, model):
    """Everything the page shows, as one JSON-able dict."""
    tokens = sample_tokens(cfg, ckpt, model)
    cbs = model.codebooks()
    codes, acts, _ = run(model, tokens, cfg["batch_size"], keep=[f"{s}.in" for s in cbs])
    sites = [site_data(s, cb, codes[s], acts.pop(f"{s}.in"), cfg["top"]) for s, cb in cbs.items()]
    decode = tokenizer(ckpt)[1]
    used = sorted(set(tokens.reshape(-1).tolist()))
    kind = ckpt.get("kind")
    meta = dict(ckpt=os.path.basename(os.path.dirname(os.path.abspath(cfg["ckpt"]))) + "/" + os.path.basename(cfg["ckpt"]),
                kind=kind, n_seqs=len(tokens), seq_len=tokens.shape[1], seed=cfg["seed"], context=cfg["context"],
                iters=ckpt.get("iter_num"), model={k: ckpt["model_args"][k] for k in ("n_layer", "n_head", "n_embd",
                                                                                  "cb_at", "num_codes", "k")},
                digits=need_fsm(ckpt, "browse").digits if kind == "fsm" else 0,
                effect_seqs=min(cfg["effect_seqs"], len(tokens)))
    states = read_beside(cfg["ckpt"], "states.json") if kind == "fsm" else None
    topics = read_beside(cfg["ckpt"], "topics.json") if kind == "lm" else None
    named = [r["code"] for r in (states or {}).get("per_state", [])]
    named += [c for t in (topics or {}).values() if isinstance(t, dict) for mode in ("one", "all")
              for c in (t.get(mode) or {}).get("codes", [])]  # topics.py's two modes
    named = [a for a in named if valid_code(model, a)]  # a results file of another model names other codes
    picks = effect_picks(sites, named, cfg["effect_codes"])
    return dict(meta=meta, vocab={str(i): s for i, s in zip(used, decode(used))}, seqs=tokens.tolist(), sites=sites,
                effects=forcing_effects(model, tokens, picks, cfg, decode), states=states,
                patch=read_beside(cfg["ckpt"], "patch.json") if kind == "fsm" else None, topics=topics)


def valid_code(model, address):
    """Whether an address names a code of this model."""
    try:
        model.check_intervention(Intervention(*parse_code(address)))
        return True
    except (ValueError, TypeError):
        return False


# -----------------------------------------------------------------------------
# the page: browse_page.html (HTML, CSS, JavaScript) and the data, written as one file


def json_block(data):
    """The data as JSON safe inside <script>: '<', '>' and '&' as \\u escapes (still the same JSON), so that a
    token like '</script>' cannot end the block."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "browse_page.html")


def read_page(path=PAGE):
    """browse_page.html: the page, its CSS and its script, with @CSP@, @TITLE@ and @DATA@ where
    render_page puts the Content-Security-Policy, the title and the data -> (the page, its script)."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        fail(f"cannot read the page {path} ({e.strerror}): browse.py needs browse_page.html beside it")
    if text.count("<script>") != 1 or not all(text.count(m) == 1 for m in ("@CSP@", "@TITLE@", "@DATA@")):
        fail(f"{path} is not browse.py's page: it needs one <script> and one each of @CSP@, @TITLE@, @DATA@")
    return text, text.split("<script>", 1)[1].rsplit("</script>", 1)[0]


def render_page(data, page=None):
    """The data -> the whole HTML page (a string). The script is allowed by its hash, nothing else loads.
    page: read_page()'s (page, script), read here if not given."""
    page, script = page or read_page()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
           "connect-src 'none'; form-action 'none'; base-uri 'none'")
    fill = {"@CSP@": csp, "@TITLE@": html.escape(data["meta"]["ckpt"]), "@DATA@": json_block(data)}
    return re.sub("@CSP@|@TITLE@|@DATA@", lambda m: fill[m.group()], page)  # one pass: the data holds any text


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    page = read_page()  # before the model runs: a missing page file stops at once
    t0 = time.time()
    ckpt, model = load_codebook_model(cfg["ckpt"], cfg["device"])
    torch.manual_seed(cfg["seed"])
    html = render_page(page_data(cfg, ckpt, model), page)
    path = cfg["out"] or os.path.join(os.path.dirname(os.path.abspath(cfg["ckpt"])), "browse.html")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(html)
    os.replace(tmp, path)
    size = os.path.getsize(path)
    print(f"wrote {path}: {size / 1e6:.2f} MB ({size} bytes) in {time.time() - t0:.1f} s")
    return path


if __name__ == "__main__":
    main()
