"""
A trained codebook model seen from outside: load a checkpoint that has codebooks, turn text into its
tokens and back, run it over many sequences to collect the codes it selects, name and parse codes, and
write results next to the checkpoint, and the statistics of codes behind `steer.py usage / show / search`.
What steer.py (the FSM), topics.py (language models) and browse.py (the HTML code browser) share; no
script imports another.

    from helpers.readout import load_codebook_model, tokenizer, run, parse_codes, flat_ids, code_name, write_json
    ckpt, model = load_codebook_model("out-fsm/ckpt.pt", "cpu")   # a one-line error if it is not one
    encode, decode, render = tokenizer(ckpt)                      # FSM digits, or the LM's meta.json encoding
    codes, acts, logits = run(model, tokens, batch_size=100)      # codes {"L1.mlp": (B, T, G, k)}, in batches
    ivs = parse_codes(model, "L3.mlp:5,L1.attn.h2:40")            # Interventions, checked against the model
    code_name("L1.attn", flat, num_codes)                         # a flat id -> "L1.attn.h2:40"
    usage_stats(code_counts(codes["L1.mlp"], cb))                 # alive, entropy, histogram (steer.py usage)
    code_scores(cb, acts["L1.mlp.in"], codes["L1.mlp"])           # each firing's score (steer.py show)
    search_codes(codes, model.codebooks(), regex_labels(tokens, decode, pattern))  # steer.py search

This is the only place that knows what data a checkpoint was trained on (its "kind": "fsm" or "lm").
"""

import math
import os
import string

import torch
import torch.nn.functional as F

import tinystories_data
from codebook import exact_fp32, flat_code_ids, similarity, usage
from fsm_data import FSM
from helpers.common import Progress, fail, load_checkpoint, pick_device, save_json
from model import format_code, make_interventions, model_from_checkpoint
from tuned import use_tuned_search


def load_codebook_model(path, device="cpu"):
    """-> (checkpoint dict, model in eval mode on device, with the tuned search); a one-line error for
    anything that is not a train.py checkpoint with codebooks."""
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        fail(f"{path} is not a checkpoint written by train.py")
    try:
        model = use_tuned_search(model_from_checkpoint(ckpt, pick_device(device))).eval()
    except (KeyError, TypeError, RuntimeError) as e:
        fail(f"{path}: the weights do not fit its model_args ({type(e).__name__})")
    if not model.codebooks():
        fail(f"{path} has no codebooks (cb_at=none): nothing to read or steer")
    return ckpt, model


def need_fsm(ckpt, what):
    """The checkpoint's FSM, or a one-line error saying that `what` needs one."""
    if ckpt.get("kind") != "fsm":
        fail(f"{what} needs an FSM checkpoint; this one has kind={ckpt.get('kind')!r}")
    f = ckpt["fsm"]
    return FSM(f["num_states"], f["num_edges"], base=f.get("base", 10), seed=f["seed"])


def sample_sequences(ckpt, n_seqs, block_size, seed=0, data_dir=""):
    """(n_seqs, block_size) tokens to read a model on: FSM walks drawn with seed, or for a language model
    fixed windows of its val.bin (data_dir, default the one it was trained on)."""
    if ckpt.get("kind") == "fsm":
        return need_fsm(ckpt, "sampling").sample(n_seqs, block_size, torch.Generator().manual_seed(seed))
    data_dir = data_dir or ckpt.get("data", {}).get("data_dir", "")
    try:
        val = tinystories_data.load_tokens(data_dir)[1]
        return tinystories_data.fixed_windows(val, n_seqs, block_size)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{e} (the token data of this language model; --data_dir=DIR to point at it)")


def tokenizer(ckpt):
    """(encode, decode, render): encode(text) -> ids, BOS first; decode(ids) -> one string per token;
    render(ids, pos0, mark) -> readable text of a window starting at position pos0, the token at position
    mark in [brackets]. Language models (kind "lm"): the encoding in the checkpoint's meta.json, EOT
    first and shown as '|'. FSM: digits, BOS shown as '|', a space before each state."""
    if ckpt.get("kind") == "lm":
        meta = ckpt["data"]["meta"]
        try:
            enc = tinystories_data.make_encoding(meta["encoding"])
        except (ValueError, OSError) as e:
            fail(str(e))

        def encode(text):
            return [meta["eot"]] + enc.encode_ordinary(text)

        def piece(i):  # an id the tokenizer lacks (a padded row of Pythia's head) shows as U+FFFD
            try:
                return enc.decode_single_token_bytes(i).decode("utf-8", "replace") or "\ufffd"
            except KeyError:
                return "\ufffd"

        def decode(ids):  # a character split over byte tokens shows as U+FFFD
            return ["|" if i == meta["eot"] else piece(i) for i in ids]

        def render(ids, pos0=0, mark=None):
            return "".join(f"[{s}]" if p == mark else s for p, s in enumerate(decode(ids), pos0))
        return encode, decode, render
    fsm = need_fsm(ckpt, "decoding tokens")
    alphabet = (string.digits + string.ascii_lowercase)[:fsm.base]

    def encode(text):
        bad = [c for c in text if c not in alphabet]
        if bad:
            fail(f"prompt {text!r}: FSM prompts are digits in {alphabet!r}, got {bad[0]!r}")
        return [fsm.bos] + [alphabet.index(c) for c in text]

    def decode(ids):
        return ["|" if i == fsm.bos else alphabet[i] for i in ids]

    def render(ids, pos0=0, mark=None):
        return "".join((" " if p > 0 and (p - 1) % fsm.digits == 0 else "") + (f"[{s}]" if p == mark else s)
                       for p, s in enumerate(decode(ids), pos0))
    return encode, decode, render


# -----------------------------------------------------------------------------
# codes: named, parsed, collected


def flat_ids(codes, num_codes):
    """(B, T, G, k) ids -> (B*T, G*k) ids distinct across groups (codebook.flat_code_ids: group g's code c
    is g*C + c), so that one bincount counts every code of every head."""
    B, T, G, k = codes.shape
    return flat_code_ids(codes, num_codes).reshape(B * T, G * k)


def code_name(site, flat, num_codes):
    """A flat id (from flat_ids) -> its address, e.g. 'L1.attn.h2:40'."""
    return format_code(site, int(flat) // num_codes, int(flat) % num_codes)


def parse_codes(model, text, ablate=False, positions=None):
    """'L3.mlp:5,L1.attn.h2:40' -> [Intervention], checked against the model."""
    try:
        out = make_interventions(filter(None, (s.strip() for s in text.split(","))), ablate, positions)
        for iv in out:
            model.check_intervention(iv)
    except ValueError as e:
        fail(str(e))
    return out


@torch.no_grad()
def run(model, tokens, batch_size, keep=(), desc="forward"):
    """tokens (B, T) -> codes {site: (B, T, G, k)}, activations {name in keep: (B*T, H)}, logits (B, T, V)."""
    dev = next(model.parameters()).device
    codes, acts, logits = {}, {k: [] for k in keep}, []
    batches = tokens.split(batch_size)
    bar = Progress(len(batches), desc)
    for x in batches:
        cache = {}
        lg, _, c, _ = model(x.to(dev), activations=cache)
        for s, v in c.items():
            codes.setdefault(s, []).append(v.cpu())
        for k in keep:
            acts[k].append(cache[k].reshape(-1, cache[k].shape[-1]).float().cpu())
        logits.append(lg.cpu())
        bar.update()
    bar.close()
    return {s: torch.cat(v) for s, v in codes.items()}, {k: torch.cat(v) for k, v in acts.items()}, torch.cat(logits)


def write_json(ckpt_path, name, obj):
    """Write obj as name next to the checkpoint it came from (atomically)."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), name)
    save_json(path, obj)
    print(f"wrote {path}")
    return path


# -----------------------------------------------------------------------------
# statistics of codes: what `steer.py usage`, `show` and `search` compute (and browse.py shows)


def pair_counts(ids, labels, num_labels, num_codes):
    """ids (P, n) codes firing at P positions (distinct within a row), labels (P,) pattern id or -1 ->
    for each (pattern, code) pair that co-occurs: lab (U,), code (U,), tp (U,) = |M and fired|;
    fired (num_codes,) firings per code; size (num_labels,) = |M| per pattern. No loop over codes."""
    fired = torch.bincount(ids.reshape(-1), minlength=num_codes)
    m = labels >= 0
    size = torch.bincount(labels[m], minlength=num_labels)
    uniq, tp = torch.unique((labels[m, None] * num_codes + ids[m]).reshape(-1), return_counts=True)
    return uniq // num_codes, uniq % num_codes, tp, fired, size


def code_counts(codes, cb):
    """codes (B, T, G, k) of one site -> (G, C) firings of each code, as doubles."""
    G, C = cb.groups, cb.num_codes
    return torch.bincount(flat_ids(codes, C).reshape(-1), minlength=G * C).view(G, C).double()


def usage_stats(n):
    """(G, C) firings -> codebook.usage (alive fraction, entropy_bits), the most bits, log2 C, and the codes
    by firings in decades (the histogram)."""
    hist = {"0": int((n == 0).sum())}
    for e in range(int(math.log10(max(n.max().item(), 1))) + 1):
        hist[f"{10 ** e}-{10 ** (e + 1) - 1}"] = int(((n >= 10 ** e) & (n < 10 ** (e + 1))).sum())
    return dict(**usage(n), max_bits=math.log2(n.shape[1]), histogram=hist)


@torch.no_grad()
def code_scores(cb, acts, codes, max_elems=1 << 22):
    """How strongly each firing selects its code: codebook.similarity, the score the search ranks by (the
    input in the layer's LayerNorm space dotted with the code's unit vector). acts (B*T, D) the codebook's
    input, codes (B, T, G, k) -> (B*T, G, k) float scores, one per selected code; max_elems scores at once."""
    dev = cb.codebook.device
    x = cb.normalize(acts.to(dev))  # (P, G, d)
    unit = F.normalize(cb.codebook, dim=-1)  # (G, C, d), as the search's
    ids = codes.reshape(x.shape[0], cb.groups, -1).to(dev)  # (P, G, k)
    out, n = torch.empty(ids.shape), max(1, max_elems // (cb.groups * cb.num_codes))  # tokens a chunk
    with exact_fp32():
        for i in range(0, len(x), n):
            out[i:i + n] = similarity(x[i:i + n], unit).gather(-1, ids[i:i + n]).cpu()
    return out


def firings_by_score(codes, scores, group, code):
    """The positions (of B*T) where a code fires, best score first (ties: the earlier position), and their scores."""
    hit = codes.reshape(scores.shape)[:, group] == code  # (P, k): a code sits in one slot at most
    where = hit.any(-1).nonzero().squeeze(1)
    score = scores[:, group][hit]
    order = score.argsort(descending=True, stable=True)
    return where[order], score[order]


def regex_labels(tokens, decode, pattern):
    """tokens (B, T), a compiled regex -> labels (B*T,): 0 at the token where a non-empty match of the regex on
    the decoded text ends, else -1."""
    labels = torch.full(tokens.shape, -1)
    for b, row in enumerate(tokens.tolist()):
        pieces = decode(row)
        ends = torch.tensor([len(s) for s in pieces]).cumsum(0)  # one past each token's last character
        for m in pattern.finditer("".join(pieces)):
            if m.end() > m.start():
                labels[b, torch.searchsorted(ends, m.end() - 1, right=True)] = 0
    return labels.reshape(-1)


def search_codes(codes, cbs, labels):
    """Every code that fires on a pattern (labels (B*T,) 0 on it, -1 off) with its precision, recall, F1 and
    firings, over all sites, best F1 first (ties: site order, then code id)."""
    rows = []
    for site, cb in cbs.items():
        _, code, tp, fired, size = pair_counts(flat_ids(codes[site], cb.num_codes), labels, 1, cb.groups * cb.num_codes)
        for c, k, f in zip(code.tolist(), tp.tolist(), fired[code].tolist()):
            p, r = k / f, k / size[0].item()
            rows.append(dict(code=code_name(site, c, cb.num_codes), precision=p, recall=r,
                             f1=2 * p * r / (p + r), fired=f))
    rows.sort(key=lambda r: -r["f1"])
    return rows
