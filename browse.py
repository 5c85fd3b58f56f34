"""
See what the codes mean: one command writes a self-contained HTML code browser beside the checkpoint.

    python browse.py --ckpt=out-fsm/ckpt.pt            # -> out-fsm/browse.html; open it in any browser
    python browse.py --ckpt=out-stories/ckpt.pt        # a language model: its val.bin, topics.json if there
    python browse.py --ckpt=out-fsm/ckpt.pt --n_seqs=100 --effect_codes=64   # caps for a big model

One HTML file: no server, no network (a Content-Security-Policy meta tag forbids every outside load), the
data embedded as one JSON block, drawn by a little plain JavaScript and inline SVG. Links: browse.html#L1.mlp:88
(a code), #search=REGEX (regex search), #seq=3 (a sequence with the codes of each token), #fsm, #topics.

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
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from codebook import Intervention
from helpers.common import fail, parse_value
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
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip() + "\n\nflags and defaults: " + " ".join(f"--{k}={v!r}" for k, v in FLAGS.items()))
        sys.exit(0)
    cfg = dict(FLAGS)
    for a in argv:
        key, eq, text = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if not eq:
            fail(f"bad argument {a!r}: expected --key=value")
        if key not in FLAGS:
            fail(f"unknown flag --{key}; valid: {', '.join(FLAGS)}")
        cfg[key] = parse_value(key, text, FLAGS[key])
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
# the page: HTML, CSS, JavaScript and the data, in one file


def json_block(data):
    """The data as JSON safe inside <script>: '<', '>' and '&' as \\u escapes (still the same JSON), so that a
    token like '</script>' cannot end the block."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(data):
    """The data -> the whole HTML page (a string). The script is allowed by its hash, nothing else loads."""
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
           "connect-src 'none'; form-action 'none'; base-uri 'none'")
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n"
            f"<title>codes of {html.escape(data['meta']['ckpt'])}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<nav id=\"nav\"></nav>\n<main id=\"main\"><p>This page needs JavaScript.</p></main>\n"
            f"<pre id=\"errors\"></pre>\n"
            f"<script type=\"application/json\" id=\"data\">{json_block(data)}</script>\n"
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 1.5em 2em;color:#222}
nav{position:sticky;top:0;background:#f4f4f4;padding:.5em;border-bottom:1px solid #ccc;display:flex;gap:1em;align-items:center}
nav a{text-decoration:none;color:#036}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
th.sort{cursor:pointer;color:#036}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ctx{font-family:ui-monospace,monospace;white-space:pre}.ctx mark{background:#fd6;font-weight:bold}
.tok{font-family:ui-monospace,monospace;white-space:pre;cursor:pointer;border-radius:2px}.tok:hover,.tok.on{background:#cdf}
.cards{display:flex;flex-wrap:wrap;gap:1em}.card{border:1px solid #ddd;padding:.5em;border-radius:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:1em}
h2{margin:.8em 0 .3em}h3{margin:.6em 0 .2em;font-size:1em}.dim{color:#777}#errors{color:#b00}
"""

SCRIPT = r""""use strict";
// The page: a hash router over the embedded data. Everything is built with DOM calls and text nodes, never
// from HTML strings, so that any token (a closing script tag, <b>, &) shows as the text it is.
const errors = [];
window.addEventListener("error", e => {
  errors.push(String(e.message));
  document.getElementById("errors").textContent = "script error: " + errors.join("; ");
  document.body.dataset.errors = String(errors.length);
});
const D = JSON.parse(document.getElementById("data").textContent);
const M = D.meta, L = M.seq_len, P = M.n_seqs * M.seq_len;

function bytes(b64) {
  const s = atob(b64), a = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
  return a;
}
for (const s of D.sites) {  // codes (P, G, k) as typed arrays; scores quantised to 16 bits over [lo, hi]
  const b = bytes(s.codes);
  s.ids = s.width === 4 ? new Uint32Array(b.buffer) : new Uint16Array(b.buffer);
  s.q = new Uint16Array(bytes(s.scores).buffer);
  s.n = s.groups * s.k;
}
const SITE = Object.fromEntries(D.sites.map(s => [s.name, s]));

// --- small helpers: elements, numbers, code addresses ---
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) e[k] = v; else e.setAttribute(k, v);
  }
  for (const c of kids.flat(Infinity)) if (c !== null && c !== undefined)
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of kids.flat(Infinity)) if (c !== null && c !== undefined)
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
const fmt = (x, d = 3) => Number(x).toFixed(d);
const name = (site, g, c) => site.endsWith("attn") ? `${site}.h${g}:${c}` : `${site}:${c}`;
const flatName = (s, f) => name(s.name, Math.floor(f / s.num_codes), f % s.num_codes);
const link = (addr, text) => el("a", {href: "#" + addr}, text || addr);
function parseCode(text) {
  const m = /^L(\d+)\.(attn|mlp)(?:\.h(\d+))?:(\d+)$/.exec(text.trim());
  if (!m || !SITE[`L${m[1]}.${m[2]}`]) return null;
  const s = SITE[`L${m[1]}.${m[2]}`], g = Number(m[3] || 0), c = Number(m[4]);
  return g < s.groups && c < s.num_codes ? {s, g, c, addr: name(s.name, g, c)} : null;
}
const tokText = id => D.vocab[id];
function rng(seed) {  // mulberry32: the same "random" sample on every load
  return () => {
    seed = (seed + 0x6D2B79F5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
function hashString(text) {
  let h = 2166136261;
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 16777619);
  return h >>> 0;
}

// a window of a sequence as text, the token at pos marked (as steer.py show renders it)
function context(flatPos, before = M.context, after = 3) {
  const b = Math.floor(flatPos / L), p = flatPos % L, seq = D.seqs[b], lo = Math.max(0, p - before);
  const out = el("a", {class: "ctx", href: `#seq=${b}&pos=${p}`});
  for (let t = lo; t < Math.min(L, p + after); t++) {
    if (M.digits && t > 0 && (t - 1) % M.digits === 0) out.append(" ");
    out.append(t === p ? el("mark", {}, tokText(seq[t])) : tokText(seq[t]));
  }
  return out;
}
function table(head, rows, attrs) {
  return el("table", attrs || {}, el("tr", {}, head.map(h => h instanceof Node ? h : el("th", {}, h))),
            rows.map(r => el("tr", {}, r.map(c => c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c)))));
}
const num = (x, d) => el("td", {class: "n"}, d === undefined ? String(x) : fmt(x, d));

// bars: one group per label, one bar per series; values in [0, max]
function bars(labels, series, colors, opts = {}) {
  const W = opts.width || 640, H = opts.height || 180, pad = 30, n = labels.length, m = series.length;
  const max = opts.max || Math.max(1e-12, ...series.flat()), bw = (W - pad) / n;
  const counts = !opts.max && series.flat().every(Number.isInteger);
  const B = opts.labels === false ? 4 : 40, g = svg("svg", {width: W, height: H + B, viewBox: `0 0 ${W} ${H + B}`, role: "img"});
  g.append(svg("line", {x1: pad, y1: H, x2: W, y2: H, stroke: "#888"}));
  for (const f of opts.labels === false ? [1] : [0, 0.5, 1]) g.append(svg("text", {x: 0, y: H - f * (H - 10) + 4, "font-size": 10},
                                            counts ? String(Math.round(f * max)) : fmt(f * max, 2)));
  labels.forEach((lab, i) => {
    series.forEach((vals, j) => {
      const h = (H - 10) * vals[i] / max, x = pad + i * bw + 2 + j * (bw - 4) / m;
      g.append(svg("rect", {x, y: H - h, width: Math.max(1, (bw - 4) / m - 1), height: h, fill: colors[j]},
                   svg("title", {}, `${lab}: ${fmt(vals[i], 4)}`)));
    });
    if (n <= 40 && opts.labels !== false) g.append(svg("text", {x: pad + i * bw + bw / 2, y: H + 12, "font-size": 10, "text-anchor": "end",
                                       transform: `rotate(-35 ${pad + i * bw + bw / 2} ${H + 12})`}, lab));
  });
  return g;
}
function legend(names, colors) {
  return el("div", {}, names.map((t, j) => el("span", {style: `color:${colors[j]};margin-right:1em`}, "\u25A0 " + t)));
}

// --- the index: every site, then the codes of one site sortable by firings ---
function viewIndex(params) {
  const site = SITE[params.site] || D.sites[0], main = [];
  main.push(el("h2", {}, "Codebook sites"),
    el("p", {class: "dim"}, `${M.ckpt}: ${M.kind}, ${M.model.n_layer} layers, codebooks at ${M.model.cb_at}, ` +
       `C=${M.model.num_codes}, k=${M.model.k}; ${M.n_seqs} sequences of ${L} tokens (${P} positions), seed ${M.seed}.`));
  main.push(table(["site", "alive", "usage entropy", "codes by firings (0, 1-9, 10-99, ...)"], D.sites.map(s => {
    const u = s.usage, keys = Object.keys(u.histogram);
    return [el("a", {href: `#site=${s.name}`}, s.name), num(u.alive, 3), `${fmt(u.entropy_bits, 2)} of ${fmt(u.max_bits, 2)} bits`,
            bars(keys, [keys.map(k => u.histogram[k])], ["#47a"], {width: 200, height: 36, labels: false})];
  }), {id: "sites"}));
  const order = params.sort === "asc" ? 1 : -1, limit = Number(params.limit || 100);
  const ids = [...s_range(site.firings.length)].sort((a, b) => order * (site.firings[a] - site.firings[b]) || a - b);
  const head = ["code", el("th", {class: "sort"}, el("a", {href: `#site=${site.name}&sort=${order < 0 ? "asc" : "desc"}`},
                                                        `firings ${order < 0 ? "\u25BC" : "\u25B2"}`)), "density", "top context"];
  main.push(el("h2", {}, `Codes of ${site.name}`),
    el("p", {}, D.sites.map(s => [el("a", {href: `#site=${s.name}`}, s.name), " "])),
    table(head, ids.slice(0, limit).map(f => {
      const top = site.top[f];
      return [link(flatName(site, f)), num(site.firings[f]), num(site.firings[f] / P, 4), top ? context(top[0], 8, 2) : ""];
    }), {id: "codes"}));
  if (limit < ids.length) main.push(el("a", {href: `#site=${site.name}&sort=${params.sort || "desc"}&limit=${limit + 400}`}, "more codes"));
  return main;
}
function* s_range(n) { for (let i = 0; i < n; i++) yield i; }

// --- one code ---
function firingsOf(s, g, c) {
  const pos = [], slot = [], q = [];
  for (let p = 0; p < P; p++) for (let j = 0; j < s.k; j++) {
    const i = (p * s.groups + g) * s.k + j;
    if (s.ids[i] === c) { pos.push(p); slot.push(j); q.push(s.q[i]); }
  }
  return {pos, slot, q};
}
function topCounts(map, n) {
  return [...map.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, n);
}
function viewCode(code) {
  const {s, g, c, addr} = code, f = s.firings[g * s.num_codes + c], F = firingsOf(s, g, c), main = [];
  const qs = v => s.score_lo + (s.score_hi - s.score_lo) * v / 65535;
  main.push(el("h2", {id: "code"}, addr),
    el("p", {}, `fires at `, el("b", {id: "firings"}, String(f)), ` of ${P} positions (density ${fmt(f / P, 4)})`));
  if (!f) return main.concat(el("p", {}, "This code never fires on these sequences (a dead code)."));
  const top = s.top[g * s.num_codes + c] || [];
  const rows = [];
  for (let i = 0; i < top.length; i += 2) rows.push([num(top[i + 1], 3), context(top[i])]);
  main.push(el("h3", {}, "Top contexts by score"), table(["score", "context"], rows, {id: "top"}));
  const r = rng(hashString(addr) ^ M.seed), idx = [...s_range(F.pos.length)];
  for (let i = 0; i < Math.min(8, idx.length); i++) {
    const j = i + Math.floor(r() * (idx.length - i));
    [idx[i], idx[j]] = [idx[j], idx[i]];
  }
  main.push(el("h3", {}, "A random sample of firings"),
    table(["score \u2248", "context"], idx.slice(0, 8).sort((a, b) => a - b).map(i => [num(qs(F.q[i]), 2), context(F.pos[i])])));
  const grid = el("div", {class: "grid"});
  const qlo = F.q.reduce((a, v) => Math.min(a, v)), qhi = F.q.reduce((a, v) => Math.max(a, v));
  const hist = new Array(16).fill(0), w = (qhi - qlo + 1) / 16;
  F.q.forEach(v => hist[Math.floor((v - qlo) / w)]++);  // 16 bins over this code's own range
  grid.append(el("div", {}, el("h3", {}, "Scores"), bars(hist.map((_, i) => fmt(qs(qlo + (i + 0.5) * w), 2)), [hist],
                                                          ["#47a"], {width: 320, height: 100})));
  const slots = new Array(s.k).fill(0);
  F.slot.forEach(j => slots[j]++);
  grid.append(el("div", {}, el("h3", {}, "Slots of the top-k (0: the best)"), table(["slot", "firings"], slots.map((v, j) => [num(j), num(v)]))));
  for (const [title, off] of [["Fires on", 0], ["Token before", -1], ["Token after", 1]]) {
    const m = new Map();
    for (const p of F.pos) {
      const t = p % L + off;
      if (t >= 0 && t < L) { const id = D.seqs[Math.floor(p / L)][t]; m.set(id, (m.get(id) || 0) + 1); }
    }
    grid.append(el("div", {}, el("h3", {}, title), table(["token", "count", "share"],
      topCounts(m, 8).map(([id, n]) => [el("td", {class: "ctx"}, JSON.stringify(tokText(id))), num(n), num(n / F.pos.length, 3)]))));
  }
  const co = [];  // codes of other sites at the same positions: count and lift
  for (const o of D.sites) {
    if (o === s) continue;
    const m = new Map();
    for (const p of F.pos) for (let i = p * o.n; i < (p + 1) * o.n; i++) {
      const fl = Math.floor((i - p * o.n) / o.k) * o.num_codes + o.ids[i];
      m.set(fl, (m.get(fl) || 0) + 1);
    }
    for (const [fl, n] of m) co.push([o, fl, n, (n / F.pos.length) / (o.firings[fl] / P)]);
  }
  co.sort((a, b) => b[2] - a[2] || b[3] - a[3]);
  grid.append(el("div", {}, el("h3", {}, "Fires with (other sites, same position)"),
    table(["code", "together", "lift"], co.slice(0, 10).map(([o, fl, n, lift]) => [link(flatName(o, fl)), num(n), num(lift, 1)]))));
  const eff = D.effects[addr];
  grid.append(el("div", {id: "effect"}, el("h3", {}, "Forced at every position: next-token probability"),
    eff ? table(["promoted", "\u0394p", "suppressed", "\u0394p"], eff.up.map((u, i) =>
      [el("td", {class: "ctx"}, JSON.stringify(u[0])), num(u[1], 4), el("td", {class: "ctx"}, JSON.stringify(eff.down[i][0])), num(eff.down[i][1], 4)]))
        : el("p", {class: "dim"}, `not precomputed: the page holds the effects of ${Object.keys(D.effects).length} codes, those named in ` +
                                    `states.json or topics.json, then the most frequent (browse.py --effect_codes)`),
    eff ? el("p", {class: "dim"}, `mean over ${M.effect_seqs} sequences' positions`) : null));
  main.push(grid);
  return main;
}

// --- regex search: the same numbers as steer.py search ---
function search(source) {
  const re = new RegExp(source, "g"), labels = new Uint8Array(P);
  let matches = 0;
  D.seqs.forEach((seq, b) => {
    const pieces = seq.map(tokText), ends = [];
    let n = 0;
    for (const x of pieces) { n += x.length; ends.push(n); }
    for (const m of pieces.join("").matchAll(re)) {
      if (!m[0].length) continue;
      const last = m.index + m[0].length - 1;
      let t = 0;
      while (ends[t] <= last) t++;  // the token holding the match's last character
      if (!labels[b * L + t]) { labels[b * L + t] = 1; matches++; }
    }
  });
  const rows = [];
  for (const s of D.sites) {
    const tp = new Map();
    for (let p = 0; p < P; p++) if (labels[p]) for (let i = p * s.n; i < (p + 1) * s.n; i++) {
      const fl = Math.floor((i - p * s.n) / s.k) * s.num_codes + s.ids[i];
      tp.set(fl, (tp.get(fl) || 0) + 1);
    }
    for (const fl of [...tp.keys()].sort((a, b) => a - b)) {
      const k = tp.get(fl), f = s.firings[fl], prec = k / f, rec = k / matches;
      rows.push({code: flatName(s, fl), precision: prec, recall: rec, f1: 2 * prec * rec / (prec + rec), fired: f});
    }
  }
  rows.sort((a, b) => b.f1 - a.f1);
  return {matches, rows};
}
function viewSearch(params) {
  const q = params.search || "", min = Number(params.min || 0), main = [];
  const box = el("input", {id: "regex", size: 30, value: q}), thr = el("input", {id: "min", size: 5, value: String(min)});
  const go = () => { location.hash = `search=${encodeURIComponent(box.value)}&min=${encodeURIComponent(thr.value)}`; };
  box.onkeydown = thr.onkeydown = e => { if (e.key === "Enter") go(); };
  main.push(el("h2", {}, "Codes that fire where a regex matches"),
    el("p", {}, "regex ", box, " precision \u2265 ", thr, " ", el("button", {onclick: go}, "search")),
    el("p", {class: "dim"}, "Positions: the token where a match on the decoded text ends. Ranked by F1; as steer.py search."));
  if (!q) return main;
  let res;
  try { res = search(q); } catch (e) { return main.concat(el("p", {id: "bad"}, `bad regex: ${e.message}`)); }
  if (!res.matches) return main.concat(el("p", {id: "nomatch"}, `/${q}/ matches nowhere in the ${M.n_seqs} sequences`));
  const rows = res.rows.filter(r => r.precision >= min);
  main.push(el("p", {}, `/${q}/ matches at `, el("b", {id: "matches"}, String(res.matches)), ` of ${P} positions; ` +
                        `${rows.length} codes with precision \u2265 ${min}`),
    table(["code", "precision", "recall", "F1", "fired"], rows.slice(0, 100).map(r => {
      const td = num(r.f1, 3);
      td.dataset.code = r.code; td.dataset.precision = r.precision; td.dataset.recall = r.recall;
      td.dataset.f1 = r.f1; td.dataset.fired = r.fired; td.className = "n hit";
      return [link(r.code), num(r.precision, 3), num(r.recall, 3), td, num(r.fired)];
    }), {id: "results"}));
  return main;
}

// --- one sequence, every token's codes ---
function viewSeq(params) {
  const b = Math.min(M.n_seqs - 1, Math.max(0, Number(params.seq) || 0)), seq = D.seqs[b];
  const info = el("div", {id: "tokcodes"}), line = el("div", {id: "story"});
  const show = p => {
    for (const t of line.children) t.classList.toggle("on", Number(t.dataset.pos) === p);
    info.replaceChildren(el("h3", {}, `position ${p}: `, el("span", {class: "ctx"}, JSON.stringify(tokText(seq[p])))),
      table(["site", "codes (score \u2248)"], D.sites.map(s => [s.name, [...s_range(s.n)].map(j => {
        const i = (b * L + p) * s.n + j, g = Math.floor(j / s.k);
        return [link(name(s.name, g, s.ids[i])), ` (${fmt(s.score_lo + (s.score_hi - s.score_lo) * s.q[i] / 65535, 2)}) `];
      })])));
  };
  seq.forEach((id, p) => {
    if (M.digits && p > 0 && (p - 1) % M.digits === 0) line.append(" ");
    line.append(el("span", {class: "tok", "data-pos": p, onclick: () => show(p), onmouseenter: () => show(p)}, tokText(id)));
  });
  const nav = el("p", {}, b > 0 ? el("a", {href: `#seq=${b - 1}`}, "\u2190 previous") : "", ` sequence ${b} (of 0 to ${M.n_seqs - 1}) `,
                 b + 1 < M.n_seqs ? el("a", {href: `#seq=${b + 1}`}, "next \u2192") : "");
  setTimeout(() => show(Math.min(L - 1, Number(params.pos) || 0)), 0);
  return [el("h2", {}, "A sequence, token by token"), nav,
          el("p", {class: "dim"}, "Point at a token to see the codes it selects at every site."), line, info];
}

// --- TokFSM: the state table, Figure 6a (codes vs neurons), Figure 4 (patching) ---
function viewFsm() {
  const main = [el("h2", {}, "TokFSM")], S = D.states, Pa = D.patch;
  if (!S) main.push(el("p", {}, "No states.json beside the checkpoint: run python steer.py states --ckpt=... and rebuild."));
  else {
    const names = Object.keys(S.sites), colors = ["#47a", "#bbb", "#a74", "#ddd"];
    main.push(el("h3", {}, "Figure 6a: codes against neurons as classifiers of the state"),
      legend(["state: code precision", "state: neuron precision", "state+digit: code", "state+digit: neuron"], colors),
      bars(names, [names.map(n => S.sites[n].state.code_precision), names.map(n => S.sites[n].state.neuron_precision),
                   names.map(n => S.sites[n].state_digit.code_precision), names.map(n => S.sites[n].state_digit.neuron_precision)],
           colors, {max: 1}),
      el("p", {class: "dim"}, `neurons thresholded at the best code's recall; ${S.n_seqs} sequences, seed ${S.seed}`),
      el("h3", {}, `The best code of each state at ${S.site}, against the best neuron`),
      table(["state", "count", "code", "precision", "recall", "neuron", "neuron precision"],
            S.per_state.map(r => [num(r.state), num(r.count), link(r.code), num(r.precision), num(r.recall), r.neuron, num(r.neuron_precision)]),
            {id: "states"}));
  }
  if (!Pa) main.push(el("p", {}, "No patch.json beside the checkpoint: run python steer.py patch --ckpt=... and rebuild."));
  else {
    const names = Object.keys(Pa.jsd);
    main.push(el("h3", {}, "Figure 4: JSD to the target state's distribution after patching, normalised by no patch"),
      bars(names, [names.map(n => Pa.jsd[n])], ["#47a"], {max: 1}),
      Pa.force_success !== undefined ? el("p", {}, `all MLP codes of t forced: the next digit favours t's successors in ` +
        `${fmt(Pa.force_success)} of trials (${fmt(Pa.force_baseline)} unpatched)`) : null);
  }
  return main;
}

// --- language models: topics.json ---
function viewTopics() {
  const T = D.topics, main = [el("h2", {}, "Topics")];
  if (!T) return main.concat(el("p", {}, "No topics.json beside the checkpoint: run python topics.py --ckpt=... and rebuild."));
  const S = T.settings || {};
  main.push(el("p", {}, `codes chosen by the ${S.rule} rule on ${S.n_passages} passages; forced in the `,
    `"one" mode (a slot of its head each) and the "all" mode (all k slots of a head, one code per head); `,
    `steered = the share of generations that mention the topic (random: as many codes of the same heads and firing frequency)`));
  for (const [t, r] of Object.entries(T)) {
    if (["mean", "settings", "sweep", "matrix"].includes(t)) continue;
    const card = [el("h3", {}, t), el("p", {}, `regex /${r.pattern}/, in ${fmt(r.base_rate)} of the passages; `,
      `${fmt(r.baseline)} of unsteered generations mention it`)];
    for (const mode of ["one", "all"]) {
      const m = r[mode];
      if (!m) continue;
      if (!m.n_codes) { card.push(el("p", {class: "why"}, `${mode}: no code: ${m.why_none}`)); continue; }
      card.push(el("p", {}, `${mode}: ${fmt(m.steered)} steered` + (m.random ? ` (random codes ${fmt(m.random.steered)})` : "") +
        `, CE ${fmt(m.ce_ratio)}x; ${m.n_codes} codes (${m.n_forced} slots): `,
        m.codes.map((c, i) => [link(c), m.figures && m.figures[i].gain !== undefined ? ` (topic tokens x${fmt(m.figures[i].gain)}) ` : " "])));
    }
    const m = r[(T.mean || {}).best_mode] || r.one || r.all;
    if (m && m.sample) card.push(el("p", {class: "ctx", style: "white-space:pre-wrap"}, m.sample));
    main.push(el("div", {class: "card"}, card));
  }
  return main;
}

// --- routing ---
function params() {
  const out = {}, h = location.hash.slice(1);
  if (parseCode(decodeURIComponent(h))) return {code: decodeURIComponent(h)};
  for (const part of h.split("&")) {
    const i = part.indexOf("=");
    if (i > 0) out[part.slice(0, i)] = decodeURIComponent(part.slice(i + 1));
    else if (part) out[decodeURIComponent(part)] = "";
  }
  return out;
}
function render() {
  const p = params(), main = document.getElementById("main");
  let view = "index", kids;
  if (p.code) { view = "code"; kids = viewCode(parseCode(p.code)); }
  else if ("search" in p) { view = "search"; kids = viewSearch(p); }
  else if ("seq" in p) { view = "seq"; kids = viewSeq(p); }
  else if ("fsm" in p) { view = "fsm"; kids = viewFsm(); }
  else if ("topics" in p) { view = "topics"; kids = viewTopics(); }
  else kids = viewIndex(p);
  main.replaceChildren(...kids.flat(Infinity).filter(k => k !== null && k !== undefined));
  document.body.dataset.view = view;
  document.body.dataset.ready = "1";
}
function navbar() {
  const box = el("input", {id: "address", size: 18, placeholder: "L1.mlp:88"}), msg = el("span", {class: "dim"});
  box.onkeydown = e => {
    if (e.key !== "Enter") return;
    const c = parseCode(box.value);
    if (c) { msg.textContent = ""; location.hash = c.addr; } else msg.textContent = `no code ${box.value}: try ${name(D.sites[0].name, 0, 0)}`;
  };
  document.getElementById("nav").replaceChildren(el("b", {}, "codes"), el("a", {href: "#"}, "index"),
    el("a", {href: "#search="}, "search"), el("a", {href: "#seq=0"}, "sequences"),
    M.kind === "fsm" ? el("a", {href: "#fsm"}, "TokFSM") : el("a", {href: "#topics"}, "topics"), box, msg);
}
navbar();
window.addEventListener("hashchange", render);
render();
"""


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    ckpt, model = load_codebook_model(cfg["ckpt"], cfg["device"])
    torch.manual_seed(cfg["seed"])
    html = render_page(page_data(cfg, ckpt, model))
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
