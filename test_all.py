"""
The test suite: offline, CPU, tiny shapes, fixed seeds. One section per file or folder, in the order of
the README's file table: codebook.py, model.py, fsm_data.py, tinystories_data.py (with topics.py, whose
tests need its data), train.py, steer.py (with helpers/readout.py), browse.py, tuned/, pretrained/ (load,
hub, tokenizer), helpers/ (common, distributed), benchmarks/, and last how the files stand (the layout).

    python -m pytest -q test_all.py                  # everything (what CI runs)
    python -m pytest -q test_all.py -m "not slow"    # the fast loop: no subprocess runs, compiles or gloo
"""

import base64
import copy
import dataclasses
import hashlib
import html.parser
import http.server
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import finetune
from benchmarks import search as bench
import browse
from tuned import tiled
from helpers import common
from helpers import checkpoints, distributed, evaluation, train_data
from pretrained import hub
from pretrained.load import from_pretrained
from helpers import readout, topic_text
import steer
import tinystories_data as td
import topics
import train
from codebook import CodebookLayer, Intervention, search
from tuned import use_tuned_search
from tuned.tiled import plan
from fsm_data import FSM
from model import GPT, GPTConfig, KVCache, format_code, make_interventions, model_from_checkpoint, parse_code

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# codebook.py: the plain search, the layer and its two gradients, interventions, usage, dead codes, k-means


def brute_topk(x, codebook, k):
    """Reference search: the full (N, G, C) cosine score matrix at once."""
    codes = codebook / codebook.norm(dim=-1, keepdim=True)
    scores = torch.einsum("ngd,gcd->ngc", x, codes)
    return scores.topk(k, dim=-1).indices


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("C, max_elems", [
    (97, 1 << 30),  # one tile
    (301, 1 << 11),  # tuned: code chunks of 61 (the last 57), 6 tokens a tile; plain: 1 token a chunk
    (2500, 1 << 16),  # tuned: strided blocks for k = 4, chunks of 1264 codes (the last padded to whole blocks)
    (5000, 1 << 17),  # tuned: strided blocks for k = 1 as well, chunks of 2512 codes
])
def test_every_search_matches_brute_topk(k, groups, C, max_elems):
    """The plain search (codebook.py) and the tuned one on the CPU's and on the GPU's plan (codebook_fast.py,
    run here on the CPU) against every cosine score at once."""
    torch.manual_seed(0)
    N, d = 200, 16
    x = torch.randn(N, groups, d)
    cb = torch.randn(groups, C, d) * torch.rand(groups, C, 1) * 3  # norms vary: cosine, not dot product
    want = brute_topk(x, cb, k)
    assert not torch.equal(torch.einsum("ngd,gcd->ngc", x, cb).topk(k, -1).indices, want)  # a dot product differs
    assert torch.equal(search(x, cb, k, max_elems=max_elems), want)
    for kind in ("cpu", "cuda"):
        ids = tiled.search(x, cb, k, max_elems, kind=kind)
        assert ids.shape == (N, groups, k) and ids.dtype == torch.int64 and torch.equal(ids, want), kind
    for fn in (search, tiled.search):
        for bad in (0, C + 1):  # no ids, or more than there are codes
            with pytest.raises(ValueError, match=f"valid: 1 <= k <= {C}"):
                fn(x, cb, bad)


@pytest.mark.parametrize("max_elems", [97 * 4, 50, 4])  # token chunks; token and code chunks; tiny
def test_chunked_search_equals_unchunked(max_elems):
    torch.manual_seed(1)
    x = torch.randn(257, 4, 8)
    cb = torch.randn(4, 97, 8)
    for k in (1, 3):
        assert torch.equal(search(x, cb, k, max_elems=max_elems), search(x, cb, k, max_elems=1 << 30))


@pytest.mark.parametrize("k,groups", [(1, 1), (4, 2)])
def test_layer_forward_and_both_gradient_parts(k, groups):
    torch.manual_seed(3)
    layer = CodebookLayer(dim=16, num_codes=20, k=k, groups=groups)
    with torch.no_grad():
        layer.ln_weight.uniform_(0.5, 1.5)
        layer.ln_bias.normal_()
    x = torch.randn(2, 5, 16, requires_grad=True)
    g = torch.randn(2, 5, 16)
    y, ids = layer(x)
    assert y.shape == x.shape and ids.shape == (2, 5, groups, k)
    (y * g).sum().backward()
    grad_x, grad_codes = x.grad.clone(), layer.codebook.grad.clone()

    # reference, written out: mean of the selected codes in LN space; straight-through to the input;
    # the codes get the loss gradient plus d/dcodes of sum_g mean_n |out - sg(xn)|^2
    x2 = x.detach().clone().requires_grad_(True)
    codes = layer.codebook.detach().clone().requires_grad_(True)
    d = 16 // groups
    xn = F.layer_norm(x2.view(-1, groups, d), (d,), eps=1e-5) * layer.ln_weight.detach() + layer.ln_bias.detach()
    assert torch.equal(ids.view(-1, groups, k), brute_topk(xn.detach(), codes.detach(), k))
    idv = ids.view(-1, groups, k)
    out = torch.stack([codes[gi, idv[:, gi]].mean(1) for gi in range(groups)], dim=1)  # (N, G, d)
    y_ref = out + xn - xn.detach()
    mse = (out - xn.detach()).pow(2).sum(-1).mean(0).sum()
    assert torch.allclose(y.detach().view(-1, groups, d), out.detach(), atol=1e-6)
    assert torch.allclose(layer.last_mse, mse.detach(), atol=1e-4)
    ((y_ref.view(2, 5, 16) * g).sum() + mse).backward(retain_graph=True)
    assert torch.allclose(grad_x, x2.grad, atol=1e-5)
    assert torch.allclose(grad_codes, codes.grad, atol=1e-5)
    # the MSE part is really there: without it the code gradient differs
    lm_only = torch.autograd.grad((out * g.view(-1, groups, d)).sum(), codes)[0]
    assert not torch.allclose(grad_codes, lm_only, atol=1e-3)


class MatmulPrecisionSpy(torch.overrides.TorchFunctionMode):
    """Records the fp32 matmul precision of the CUDA and CPU (mkldnn) backends at every matmul call."""
    MATMULS = (torch.bmm, torch.mm, torch.matmul, torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__)

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS:
            self.seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("how", ["set_float32_matmul_precision", "allow_tf32", "fp32_precision"])
def test_search_matmuls_are_fp32_whatever_the_global_precision(how):
    """TF32 (nanoGPT's train.py turns it on) would round the scores and change ids: both searches pin
    fp32 inside, and give the user's setting back."""
    torch.manual_seed(6)
    x, cb = torch.randn(100, 2, 16), torch.randn(2, 400, 16)
    try:
        if how == "set_float32_matmul_precision":
            torch.set_float32_matmul_precision("high")
        elif how == "allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        else:  # torch >= 2.9's per-backend API, which the legacy getter then refuses to read
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.mkldnn.matmul.fp32_precision = "tf32"
        before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        assert before[0] == "tf32"
        for fn in (search, tiled.search):
            with MatmulPrecisionSpy() as spy:
                ids = fn(x, cb, 3)
            assert spy.seen and all(p == ("ieee", "ieee") for p in spy.seen), (fn, spy.seen)
            assert torch.equal(ids, brute_topk(x, cb, 3))
            assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == before
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("highest")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="needs a CUDA GPU with TF32 tensor cores (Ampere on)")
def test_gpu_ids_do_not_change_with_tf32_on():
    """With TF32 on, a plain scores-and-topk picks other ids than in fp32 at this size; both searches do not."""
    torch.manual_seed(7)
    x, cb = torch.randn(4096, 4, 32, device="cuda"), torch.randn(4, 10000, 32, device="cuda")
    fp32 = [search(x, cb, 4), tiled.search(x, cb, 4), brute_topk(x, cb, 4)]
    torch.set_float32_matmul_precision("high")
    try:
        tf32 = [search(x, cb, 4), tiled.search(x, cb, 4), brute_topk(x, cb, 4)]
    finally:
        torch.set_float32_matmul_precision("highest")
    assert not torch.equal(tf32[2], fp32[2])  # TF32 does change a brute-force search's ids here
    assert torch.equal(tf32[0], fp32[0]) and torch.equal(tf32[1], fp32[1])


def test_bf16_autocast_keeps_the_codebook_fp32():
    """Under bf16 autocast a codebook takes its input to fp32 and picks the codes fp32 picks."""
    torch.manual_seed(0)
    layer = CodebookLayer(32, 64, 2, 4)
    x = torch.randn(2, 8, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ids = layer(x)
    y32, ids32 = layer(x.float())
    assert y.dtype == torch.float32 and torch.equal(ids, ids32) and torch.equal(y, y32)


def test_force_and_ablate():
    torch.manual_seed(4)
    layer = CodebookLayer(dim=8, num_codes=30, k=3, groups=2).eval()
    x = torch.randn(2, 6, 8)
    _, ids = layer(x)  # (2, 6, 2, 3)
    # ablate the best code of head 1 at position 2: the rest of that row moves up one slot
    best = int(ids[0, 2, 1, 0])
    _, ab = layer(x, [Intervention("s", 1, best, ablate=True, positions=(2,))])
    assert best not in ab[0, 2, 1].tolist()
    assert ab[0, 2, 1, :2].tolist() == ids[0, 2, 1, 1:].tolist()
    assert torch.equal(ab[:, :2], ids[:, :2]) and torch.equal(ab[:, 3:], ids[:, 3:])  # other positions
    assert torch.equal(ab[:, :, 0], ids[:, :, 0])  # other head
    # force two codes into head 0 everywhere: slots -1 then -2; the best slot stays
    y, fo = layer(x, [Intervention("s", 0, 7), Intervention("s", 0, 9)])
    assert (fo[..., 0, 2] == 7).all() and (fo[..., 0, 1] == 9).all()
    assert torch.equal(fo[..., 0, 0], ids[..., 0, 0]) and torch.equal(fo[..., 1, :], ids[..., 1, :])
    # the output is the mean of the k slots, forced ones included
    expect = layer.codebook[0, fo[1, 4, 0]].mean(0)
    assert torch.allclose(y[1, 4, :4], expect, atol=1e-6)
    # negative positions count from the end; positions past the end are ignored
    _, last = layer(x, [Intervention("s", 1, 5, positions=(-1, 99))])
    assert (last[:, -1, 1, 2] == 5).all() and torch.equal(last[:, :-1], ids[:, :-1])
    with pytest.raises(ValueError, match="more than k"):
        layer(x, [Intervention("s", 0, c) for c in range(4)])
    with pytest.raises(RuntimeError, match="inference only"):
        layer.train()(x, [Intervention("s", 0, 1)])


def test_usage_counts_and_stats():
    torch.manual_seed(5)
    layer = CodebookLayer(dim=4, num_codes=10, k=2, groups=2).train()
    x = torch.randn(3, 7, 4)
    _, ids = layer(x)
    expect = torch.zeros(2, 10)
    for gi in range(2):
        expect[gi] = torch.bincount(ids[..., gi, :].reshape(-1), minlength=10).float()
    assert torch.equal(layer.uses_since_read.view(2, 10), expect)
    s = layer.stats()
    assert s["alive"] == pytest.approx((expect > 0).float().mean().item())
    p = expect / expect.sum(-1, keepdim=True)
    ent = -(p * torch.log2(p.clamp_min(1e-30))).sum(-1).mean().item()
    assert s["entropy_bits"] == pytest.approx(ent, abs=1e-5)
    assert layer.uses_since_read.sum() == 0  # read resets the window
    layer.eval()(x)
    assert layer.uses_since_read.sum() == 0  # inference does not count
    old = {k.replace("uses_since_read", "counts").replace("uses_since_reset", "fired"): v.clone() + 1
           for k, v in layer.state_dict().items()}  # a checkpoint from before the buffers' names changed
    assert "counts" in old and "fired" in old
    again = CodebookLayer(dim=4, num_codes=10, k=2, groups=2)
    again.load_state_dict(old)
    assert torch.equal(again.uses_since_reset, old["fired"]) and torch.equal(again.uses_since_read, old["counts"])


def test_dead_code_replacement():
    torch.manual_seed(6)
    layer = CodebookLayer(dim=8, num_codes=50, k=1, groups=1).train()
    x = torch.randn(40, 8)
    _, ids = layer(x)
    used = set(ids.view(-1).tolist())
    before = layer.codebook.detach().clone()
    n = layer.replace_dead_codes(rho=0.01)
    after = layer.codebook.detach()
    assert n == 50 - len(used)
    for c in range(50):
        if c in used:
            assert torch.equal(after[0, c], before[0, c])  # live codes untouched
        else:
            # moved onto (near) one of the recent normalised inputs
            dist = (layer._recent[:, 0] - after[0, c]).norm(dim=-1).min()
            assert dist < 0.05 * after[0, c].norm()
    assert layer.uses_since_reset.sum() == 0
    assert layer.replace_dead_codes() == 50  # nothing fired since: all count as dead


def test_kmeans_init_finds_clusters():
    torch.manual_seed(7)
    centers = torch.randn(4, 8) * 3
    x = (centers[torch.randint(4, (400,))] + 0.05 * torch.randn(400, 8))
    layer = CodebookLayer(dim=8, num_codes=4, k=1)
    layer.kmeans_init(x, iters=20)
    xn = layer.normalize(x)[:, 0]
    _, ids = layer.eval()(x)
    # each input now snaps to a code close to it: reconstruction error is tiny against the data spread
    err = (layer.codebook[0, ids.view(-1)] - xn).pow(2).sum(-1).mean()
    assert err < 0.1 * xn.var(0).sum()


# -----------------------------------------------------------------------------
# model.py: codebook sites, code addresses, forcing


def tiny_model(cb_at="attn+mlp", **kw):
    torch.manual_seed(8)
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, cb_at=cb_at, num_codes=12, k=1)
    for key, v in kw.items():
        setattr(cfg, key, v)
    return GPT(cfg)


def test_model_sites_and_outputs():
    m = tiny_model()
    idx = torch.randint(11, (3, 10))
    logits, loss, codes, mse = m(idx, idx)
    assert logits.shape == (3, 10, 11) and loss.ndim == 0
    assert list(codes) == ["L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]
    assert codes["L0.attn"].shape == (3, 10, 2, 1) and codes["L1.mlp"].shape == (3, 10, 1, 1)
    assert mse > 0
    assert list(tiny_model(cb_at="mlp", cb_layers=(1,)).codebooks()) == ["L1.mlp"]
    _, _, codes, mse = tiny_model(cb_at="none")(idx)
    assert codes == {} and mse is None


def test_code_addresses():
    assert parse_code("L2.attn.h3:417") == ("L2.attn", 3, 417)
    assert parse_code("L0.mlp:88") == ("L0.mlp", 0, 88)
    for s in ("L2.attn.h3:417", "L0.mlp:88", "L11.attn.h0:0"):
        assert format_code(*parse_code(s)) == s
    for bad in ("L2.attn:h3:1", "2.mlp:1", "L1.mlp", "L2.mlp:", "L1.resid:3", "L2.foo:3", "L1.mlp:-1", "L2.mlp.h1:x"):
        with pytest.raises(ValueError, match="bad code address"):
            parse_code(bad)
    m = tiny_model()
    for bad, msg in (("L5.mlp:1", "no codebook"), ("L0.attn.h2:1", "head 2"), ("L0.mlp:12", "out of range")):
        with pytest.raises(ValueError, match=msg):
            m.check_intervention(make_interventions([bad])[0])


def test_forcing_the_last_mlp_code_moves_the_residual_by_the_code_difference():
    """The last block's MLP output is its code (k = 1), added to the residual: forcing another code at one
    position moves the final residual there by exactly (new code - old code), and nowhere else."""
    m = tiny_model().eval()
    idx = torch.randint(11, (1, 6))
    base_cache, forced_cache = {}, {}
    base_logits, _, codes, _ = m(idx, activations=base_cache)
    current = int(codes["L1.mlp"][0, -1, 0, 0])
    other = (current + 1) % 12
    iv = make_interventions([f"L1.mlp:{other}"], positions=[5])
    logits, _, codes2, _ = m(idx, interventions=iv, activations=forced_cache)
    assert int(codes2["L1.mlp"][0, -1, 0, 0]) == other
    cb = m.codebooks()["L1.mlp"].codebook[0].detach()
    moved = forced_cache["L1.resid"] - base_cache["L1.resid"]  # (1, T, C)
    torch.testing.assert_close(moved[0, 5], cb[other] - cb[current], rtol=0, atol=1e-6)
    assert torch.equal(moved[0, :5], torch.zeros_like(moved[0, :5]))  # causal: earlier positions untouched
    assert not torch.allclose(logits[0, -1], base_logits[0, -1])
    out = m.generate(idx, 3, interventions=iv, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 9) and torch.equal(out[:, :6], idx)
    with pytest.raises(ValueError, match="exceed block_size"):
        m.generate(idx, 12)


def kv_model(**kw):
    """tiny_model with its weights moved off init (std 0.3), so that next-token distributions are far from
    flat and codes matter: a wrong KV cache then changes sampled tokens."""
    m = tiny_model(**dict(dict(block_size=32, k=2), **kw)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


KV_CASES = {  # name -> interventions, given the prompt length T and the new tokens n
    "none": lambda T, n: [],
    "force_mlp_all": lambda T, n: [Intervention("L0.mlp", 0, 4)],
    "force_attn_all": lambda T, n: [Intervention("L1.attn", 1, 4), Intervention("L0.attn", 0, 7)],
    "ablate_all": lambda T, n: [Intervention("L0.attn", 0, c, ablate=True) for c in range(4)]
                               + [Intervention("L1.mlp", 0, c, ablate=True) for c in range(4)],
    "force_prompt": lambda T, n: [Intervention("L0.attn", 1, 3, positions=tuple(range(T))),
                                  Intervention("L0.mlp", 0, 9, positions=tuple(range(T)))],
    "force_new": lambda T, n: [Intervention("L0.attn", 1, 3, positions=tuple(range(T, T + n))),
                               Intervention("L1.mlp", 0, 9, positions=tuple(range(T, T + n)))],
    "negative_falls_back": lambda T, n: [Intervention("L0.attn", 1, 3, positions=(-1,)),
                                         Intervention("L0.mlp", 0, 9, positions=(-2, -1))],
}


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("case", list(KV_CASES))
def test_kv_cache_samples_the_tokens_of_the_full_rerun(case, T):
    """The same seed gives the same 8 x (33 - T) tokens, up to block_size, with the cache as by rerunning
    the whole context at each step (temperature 1: every draw depends on the whole distribution)."""
    m = kv_model()
    idx = torch.randint(11, (8, T), generator=torch.Generator().manual_seed(T))
    idx[:, 0] = 10  # a BOS of sorts
    n = m.config.block_size - T + 1  # the last token sampled fills position block_size
    ivs = KV_CASES[case](T, n)

    def sample(ivs, use_cache):
        return m.generate(idx, n, interventions=ivs, generator=torch.Generator().manual_seed(1), use_cache=use_cache)

    full, cached = sample(ivs, False), sample(ivs, True)
    assert full.shape == (8, 33) and torch.equal(full[:, :T], idx)
    assert torch.equal(cached, full)
    if ivs:  # the interventions matter, so the test above could fail
        assert not torch.equal(full, sample([], False))


def test_rotary_values_and_gradient_equal_the_plain_formula():
    """model.rotate's one-pass backward (the turn back by -angle) against autograd through the textbook
    formula (x1 cos - x2 sin, x1 sin + x2 cos), bit for bit, at positions from pos0 = 3."""
    from model import rotate
    torch.manual_seed(0)
    x = torch.randn(4, 9, 6, 8, requires_grad=True)  # (B, T, heads, hs)
    y = rotate(x, pos0=3)
    g = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, g)
    freq = 10000.0 ** (-torch.arange(0, 4, dtype=torch.float32) / 4)
    angle = torch.arange(3, 12, dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (T, 1, hs / 2)
    x1, x2 = x[..., :4], x[..., 4:]
    want_y = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    (want,) = torch.autograd.grad(want_y, x, g)
    assert torch.equal(y, want_y) and torch.equal(got, want)


def test_kv_cache_logits_and_codes_equal_a_full_forward():
    """A prompt chunk, then a chunk of 3 (the shifted causal mask), then one token at a time, through a
    KVCache: the logits and codes of every position equal one forward of the whole sequence."""
    m = kv_model()
    idx = torch.randint(11, (3, 32), generator=torch.Generator().manual_seed(0))
    ivs = [Intervention("L0.attn", 1, 3, positions=(2, 9, 20)), Intervention("L1.mlp", 0, 5),
           Intervention("L0.mlp", 0, 2, ablate=True, positions=tuple(range(8, 30)))]
    logits, _, codes, _ = m(idx, interventions=ivs)
    kv, steps = KVCache(), [(0, 7), (7, 10)] + [(t, t + 1) for t in range(10, 32)]
    outs = []
    for a, b in steps:
        assert kv.T == a
        outs.append(m(idx[:, a:b], interventions=ivs, kv_cache=kv))
    assert kv.T == 32 and kv.kv["L1.attn"][0].shape == (3, 2, 32, 8)
    torch.testing.assert_close(torch.cat([o[0] for o in outs], 1), logits, rtol=0, atol=1e-5)
    for site in codes:
        assert torch.equal(torch.cat([o[2][site] for o in outs], 1), codes[site]), site
    assert not torch.allclose(m(idx)[0], logits, atol=1e-3)  # the interventions change the logits
    with pytest.raises(ValueError, match="longer than block_size"):
        m(idx[:, :1], kv_cache=kv)


def test_fsm_state_accuracy_samples_the_same_with_the_cache(monkeypatch):
    """helpers/evaluation.py's fsm_state_accuracy gets the cache through generate's default; its walks are unchanged."""
    fsm = FSM(num_states=12, num_edges=3)
    m = kv_model(vocab_size=fsm.vocab_size)
    walks, generate = {}, m.generate

    def spy(*args, **kw):
        walks[kw.get("use_cache", True)] = out = generate(*args, **kw)
        return out

    monkeypatch.setattr(m, "generate", spy)
    acc = evaluation.fsm_state_accuracy(m, fsm, 16, 32, "cpu", seed=3)
    monkeypatch.setattr(m, "generate", lambda *args, **kw: spy(*args, use_cache=False, **kw))
    assert evaluation.fsm_state_accuracy(m, fsm, 16, 32, "cpu", seed=3) == acc
    assert torch.equal(walks[True], walks[False]) and walks[True].shape == (16, 32)


@pytest.mark.slow
def test_bench_generate_quick_writes_json(tmp_path):
    out, result = run_quick("benchmarks.generate", tmp_path)
    assert "speed-up" in out
    assert set(result["workloads"]) == {"topics", "steer", "fsm"}
    for row in result["workloads"].values():
        assert row["same_samples"] is True and row["full_s"] > 0 and row["cached_s"] > 0 and row["tokens"] > 0
        assert row["speedup"] == pytest.approx(row["full_s"] / row["cached_s"])
    assert result["settings"]["samples"] == 2 and len(result["topics_codes"]) == 14  # the quick preset


@pytest.mark.slow
def test_bench_jobs_runs_a_spin_count_with_codebook_steps(tmp_path):
    """One codebook step (--cb_warmup=0) alone and in a pair, under a spin count given as a number."""
    path = tmp_path / "jobs.json"
    cmd = [sys.executable, "-m", "benchmarks.jobs", "--steps=1", "--settings=20000",
           "--train_args=--cb_warmup=0 --num_codes=32 --batch_size=8 --eval_seqs=8 --state_seqs=4", f"--out={path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(path.read_text())
    assert result["train_args"][:2] == ["--cb_warmup=0", "--num_codes=32"] and list(result["settings"]) == ["20000"]
    row = result["settings"]["20000"]
    assert row["alone_s"] > 0 and row["pair_over_alone"] == pytest.approx(row["pair_s"] / row["alone_s"])
    bad = subprocess.run(cmd[:3] + ["--settings=fast"], capture_output=True, text=True, cwd=HERE, timeout=60)
    assert bad.returncode != 0 and "a spin count" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# fsm_data.py: TokFSM


def test_fsm_facts():
    fsm = FSM()
    T = fsm.transitions
    assert T.shape == (100, 100) and np.allclose(T.sum(1), 1) and ((T > 0).sum(1) == 10).all()
    assert int(np.trace(T > 0)) == 10  # self-loops with seed 42
    pairs = {(s, t // 10) for s in range(100) for t in np.nonzero(T[s])[0]}
    assert len(pairs) == 686
    loss, acc = fsm.bayes(128)
    assert loss == pytest.approx(1.1748, abs=5e-5) and acc == pytest.approx(0.4638, abs=5e-5)
    assert FSM(seed=1).transitions.tolist() != T.tolist()


def test_fsm_sampling_and_labels():
    fsm = FSM()
    seq = fsm.sample(50, 128, torch.Generator().manual_seed(0))
    assert seq.shape == (50, 128) and (seq[:, 0] == fsm.bos).all() and (seq[:, 1:] < 10).all()
    assert fsm.state_accuracy(seq) == 1.0  # every transition of a real walk is an edge
    states = fsm.decode_states(seq)
    assert states.shape == (50, 63)
    assert torch.equal(states[:, 0], seq[:, 1] * 10 + seq[:, 2])
    lab, digit = fsm.state_labels(seq)
    assert (lab[:, 0] == -1).all() and (lab[:, -1] == -1).all()  # BOS; the unfinished 64th state
    assert torch.equal(lab[:, 4], states[:, 1]) and digit[0, 4] == 1 and digit[0, 3] == 0
    bad = seq.clone()
    bad[:, 3:5] = torch.tensor([fsm.bos, 0])
    assert fsm.state_accuracy(bad) < 1.0
    # a 3-digit FSM with a non-square state count keeps working
    f3 = FSM(num_states=150, num_edges=3, seed=0)
    s3 = f3.sample(4, 40, torch.Generator().manual_seed(0))
    assert f3.digits == 3 and f3.state_accuracy(s3) == 1.0 and f3.decode_states(s3).max() < 150
    l3, a3 = f3.bayes(40)
    assert 0 < l3 < np.log(10) and 0 < a3 < 1


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_fsm_walks_have_the_fsm_statistics(device):
    """The table sampler draws each out-edge with probability 1/E and start states uniformly, on the
    generator's device, reproducibly from the seed."""
    fsm = FSM()
    gen = torch.Generator(device=device).manual_seed(0)
    s = fsm.sample_states(4000, 26, gen)
    assert s.device.type == device
    s = s.cpu()
    again = fsm.sample_states(4000, 26, torch.Generator(device=device).manual_seed(0)).cpu()
    assert torch.equal(s, again)
    counts = np.zeros((100, 100))
    np.add.at(counts, (s[:, :-1].reshape(-1).numpy(), s[:, 1:].reshape(-1).numpy()), 1)
    assert counts[fsm.transitions == 0].sum() == 0  # only edges
    freq = counts / counts.sum(1, keepdims=True)
    edges = freq[fsm.transitions > 0]  # 1000 edges, each seen ~100 times: 1/10 within ~5 standard errors
    assert abs(edges.mean() - 0.1) < 1e-9 and np.abs(edges - 0.1).max() < 0.16
    starts = np.bincount(s[:, 0].numpy(), minlength=100)  # 40 per state on average
    assert starts.min() > 10 and starts.max() < 80
    tokens = fsm.sample(8, 128, torch.Generator(device=device).manual_seed(1))
    assert tokens.device.type == device and fsm.state_accuracy(tokens.cpu()) == 1.0


# -----------------------------------------------------------------------------
# tinystories_data.py and topics.py: token data, language models, topic steering


DOCS = ["Once upon a time, there was a cat.\nIt sat.", "The dog ran to the park!", "Ünïcödé and 42 numbers.",
        "A fourth story, with a comma.", "One more: the cat and the dog."]


def write_docs(tmp_path, sep, docs=DOCS):
    path = tmp_path / "docs.txt"
    path.write_text(sep.join(docs), encoding="utf-8")
    return path


def test_html_pages_and_passages(tmp_path):
    """Real text from HTML: the paragraphs (<p>, DocBook's div.para), not the menus or the code; passages cut
    at sentence ends."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "b.html").write_text(
        '<html><head><title>T</title><style>p {x}</style></head><body><div class="nav">Home</div>'
        '<div class="para">APT is a <em>package</em>\n   manager.<br/> It <a href="#">resolves</a> deps.</div>'
        '<pre>apt-get install x</pre><p>Second <b>one</b>.<p>Third, left open.</body></html>', encoding="utf-8")
    (tmp_path / "site" / "a.html").write_text("<p>First page.</p>", encoding="utf-8")
    (tmp_path / "site" / "notes.txt").write_text("not read", encoding="utf-8")
    assert td.read_docs(str(tmp_path / "site")) == [
        "First page.", "APT is a package manager. It resolves deps. Second one. Third, left open."]
    with pytest.raises(ValueError, match="without .html files"):
        td.read_docs(str(tmp_path))
    doc = " ".join(f"Sentence {i} has five words." for i in range(9))  # 45 words
    cut = td.passages([doc, "Short one."], 20)
    assert [len(p.split()) for p in cut] == [20, 25, 2]  # 20, then 20 + a rest of 5 (< half), then the short doc
    assert " ".join(cut[:2]) == doc and td.passages([doc], 0) == [doc]
    meta = td.prepare(str(tmp_path / "d"), input=str(tmp_path / "site"), encoding="bytes", passage_words=3, val_every=2)
    assert meta["passage_words"] == 3 and meta["tokens"]["val"] > 0
    with pytest.raises(ValueError, match="no such file"):
        td.prepare(str(tmp_path / "d"), input=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("sep,encoding", [("\n\n", "words"), ("<|endoftext|>", "bytes")])
def test_text_file_round_trip(tmp_path, sep, encoding):
    """encode, write, memmap, decode: the documents come back, each after one EOT."""
    meta = td.prepare(str(tmp_path / "d"), input=str(write_docs(tmp_path, sep)), encoding=encoding, words=10,
                      val_every=2)
    train_data, val_data, meta2 = td.load_tokens(str(tmp_path / "d"))
    assert meta2 == json.loads(json.dumps(meta)) and isinstance(train_data, np.memmap)
    enc = td.make_encoding(meta["encoding"])
    assert meta["vocab_size"] == enc.n_vocab and meta["eot"] == enc.eot_token == enc.n_vocab - 1
    for data, docs in ((train_data, DOCS[0::2]), (val_data, DOCS[1::2])):
        assert data.dtype == np.uint16 and data[0] == meta["eot"] and (data == meta["eot"]).sum() == len(docs)
        assert enc.decode(data.tolist()) == "".join("<|endoftext|>" + d for d in docs)
    if encoding == "words":  # frequent pieces became single tokens: fewer tokens than bytes
        assert 10 + 257 == meta["vocab_size"] and len(train_data) < len("".join(DOCS[0::2]).encode())
        assert len(enc.encode_ordinary(" the")) == 1
    else:
        assert meta["vocab_size"] == 257 and len(train_data) == len("".join(DOCS[0::2]).encode()) + 3


def test_batches_are_windows_of_the_data():
    data = np.arange(1000, dtype=np.uint16)
    x = td.get_batch(data, 8, 33, torch.Generator().manual_seed(0))
    assert x.shape == (8, 33) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 32, dtype=torch.int64))  # contiguous windows
    y = td.fixed_windows(data, 4, 100)
    assert y[0, 0] == 0 and y[-1, -1] == 999 and torch.equal(y, td.fixed_windows(data, 4, 100))
    with pytest.raises(ValueError):
        td.fixed_windows(data, 4, 1001)


def test_synthetic_corpus_is_deterministic_and_varied(tmp_path):
    a, ta = td.synthetic_corpus(300, seed=1)
    b, tb = td.synthetic_corpus(300, seed=1)
    c, _ = td.synthetic_corpus(300, seed=2)
    assert a == b and np.array_equal(ta, tb) and a != c
    assert len(set(a)) == 300  # no story twice
    assert set(ta.tolist()) == set(range(-1, len(td.TOPIC_STORY)))  # every topic, and stories about none
    td.prepare(str(tmp_path / "x"), synthetic=True, num_stories=200, seed=3)
    td.prepare(str(tmp_path / "y"), synthetic=True, num_stories=200, seed=3)
    for f in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "x" / f).read_bytes() == (tmp_path / "y" / f).read_bytes()


def test_topic_labels(tmp_path):
    """Each story matches its own topic's pattern and no other; stories about nothing match none; the
    saved labels and offsets point at the right stories of train.bin / val.bin."""
    docs, topics = td.synthetic_corpus(400, seed=5)
    names = list(td.TOPIC_STORY)
    assert len(names) >= 7 and {"dragon", "slide", "friend", "flower", "fire", "baby", "princess"} <= set(names)
    for d, t in zip(docs, topics):
        hits = [n for n in names if re.search(td.SYNTHETIC_TOPICS[n], d.lower())]
        assert hits == ([names[t]] if t >= 0 else []), (d, hits)
    meta = td.prepare(str(tmp_path), synthetic=True, num_stories=400, seed=5, val_every=10)
    enc = td.make_encoding(meta["encoding"])
    lab = np.load(tmp_path / "labels.npz")
    for split, first in (("val", 0), ("train", 40)):
        data = np.memmap(tmp_path / f"{split}.bin", dtype=np.uint16, mode="r")
        offs, tops = lab[f"{split}_offsets"], lab[f"{split}_topic"]
        assert len(offs) == len(tops) and np.array_equal(tops, topics[first:first + len(tops)])
        ends = list(offs[1:] - 1) + [len(data)]
        for i in (0, len(offs) // 2, len(offs) - 1):
            assert data[offs[i] - 1] == meta["eot"]
            assert enc.decode(data[offs[i]:ends[i]].tolist()) == docs[first + i]


def test_topic_scorer_by_hand():
    # 6 story tokens, 2 topics; codes 0..4. Token rows: the codes firing there (2 per token).
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 4], [1, 4], [2, 3]])
    member = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0]], dtype=torch.bool)
    rin, rout = topic_text.topic_rates(ids, member, 5)
    assert torch.allclose(rin[0], torch.tensor([1.0, 2 / 3, 1 / 3, 0.0, 0.0], dtype=torch.double))
    assert torch.allclose(rout[0], torch.tensor([0.0, 1 / 3, 1 / 3, 2 / 3, 2 / 3], dtype=torch.double))
    assert torch.allclose(rin[1], torch.tensor([0.0, 0.5, 0.0, 0.5, 1.0], dtype=torch.double))
    assert torch.allclose(rout[1], torch.tensor([0.75, 0.5, 0.5, 0.25, 0.0], dtype=torch.double))
    # the rules, on one site's counts: 2 topics, 4 codes, 100 tokens (40 in topic 0's passages, 20 in topic 1's)
    st = dict(fired=torch.tensor([20.0, 10, 5, 0]), n=torch.tensor(100.0),
              fired_in=torch.tensor([[20.0, 1, 4, 0], [0, 9, 0, 0]]), n_in=torch.tensor([[40.0], [20.0]]),
              hit_window=torch.tensor([[2.0, 0, 4, 0], [0, 6, 0, 0]]), hit_match=torch.tensor([[0.0, 0, 3, 0], [0, 1, 0, 0]]),
              pass_in=torch.tensor([[4.0, 1, 1, 0], [0, 2, 0, 0]]), pass_all=torch.tensor([8.0, 3, 1, 0]),
              n_pass_in=torch.tensor([[4.0], [2.0]]))
    cfg = topics.TopicsConfig(min_in=0.2, max_out=0.05)
    score, ok, figs = topics.rule_scores("inout", st, cfg)
    assert ok[0].tolist() == [True, False, False, False]  # code 0: in 0.5, out 0; code 2: in 0.1 < 0.2
    assert score[0, 0].item() == pytest.approx(0.5) and figs["rate_out"][1, 1].item() == pytest.approx(1 / 80)
    score, ok, _ = topics.rule_scores("window", st, cfg)  # precision where the regex is about to match
    assert ok[0].tolist() == [False, False, True, False] and score[0, 2].item() == pytest.approx(0.8)
    assert ok[1].tolist() == [False, True, False, False] and score[1, 1].item() == pytest.approx(0.6)
    score, ok, _ = topics.rule_scores("token", st, cfg)
    assert ok.tolist() == [[False, False, True, False], [False, False, False, False]]  # 3 hits at least
    score, ok, _ = topics.rule_scores("lift", st, cfg)
    assert ok[0].tolist() == [True, True, True, False]  # code 3 never fires
    assert score[0, 0] > score[0, 2] > score[0, 1]  # 0 fires only in topic 0's passages
    score, ok, _ = topics.rule_scores("passage", st, cfg)
    assert ok[0].tolist() == [True, True, True, False] and score[0, 0].item() == 1.0  # in all 4 of its passages
    # the window before a match, within a passage
    match = torch.tensor([[0], [0], [0], [1], [0]], dtype=torch.bool)
    assert topic_text.window_before(match, 2)[:, 0].tolist() == [False, True, True, False, False]
    # passages where a code fires: each pair once
    inside, every = topic_text.passage_counts(torch.tensor([[0, 1], [0, 2], [1, 2]]), torch.tensor([0, 0, 1]),
                                              torch.tensor([[True], [False]]), 3)
    assert every.tolist() == [1, 2, 2] and inside.tolist() == [[1, 1, 1]]
    # the modes: all sets each of the code's head's k slots
    c = topics.Candidate("L0.attn.h1:5", "L0.attn", 1, 5, 1.0, {})
    assert len(topics.forcing([c], "one", {"L0.attn": 4})) == 1
    assert [(iv.group, iv.code) for iv in topics.forcing([c], "all", {"L0.attn": 4})] == [(1, 5)] * 4
    # the random control: a code of the same head with about the same firing count
    fired = {"L0.attn": torch.tensor([0.0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 104, 105])}  # 2 heads x 6 codes
    got = topics.random_control([topics.Candidate("L0.attn.h1:2", "L0.attn", 1, 2, 1.0, {})], fired, {"L0.attn": 6},
                                random.Random(0), near=1)
    assert got in ([("L0.attn", 1, 1)], [("L0.attn", 1, 3)])
    texts = ["The Dragon flew.", "a dragonfly", "no topic here", "the KING smiled", "looking"]
    assert topic_text.mention_rate(texts, "dragon") == 0.4
    assert topic_text.mention_rate(texts, r"\b(prince|crown|king|castle)") == 0.2
    assert topic_text.mention_rate(texts, "prince|crown|king|castle") == 0.4  # the paper's substring match


def test_gpt2_offline_is_a_one_line_error(tmp_path, monkeypatch):
    """Without internet tiktoken's first gpt2 load fails with a long HTTPSConnectionPool(...) message."""
    def offline(name):
        raise OSError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): Max retries "
                      "exceeded with url: /gpt-2/encodings/main/vocab.bpe (Caused by NameResolutionError(...))")
    monkeypatch.setattr(td.tiktoken, "get_encoding", offline)
    monkeypatch.delenv(td.GPT2_TIKTOKEN, raising=False)  # a local ranks file would spare the download
    with pytest.raises(OSError) as e:
        td.prepare(str(tmp_path / "d"), input=str(write_docs(tmp_path, "\n\n")))
    msg = str(e.value)
    assert "\n" not in msg and "HTTPSConnectionPool" not in msg
    assert "--encoding=words" in msg and "--encoding=bytes" in msg
    td.prepare(str(tmp_path / "d"), input=str(write_docs(tmp_path, "\n\n")), encoding="bytes")  # works offline


def tiny_lm(out_dir, data_dir, **kw):
    base = dict(out_dir=str(out_dir), data_dir=str(data_dir), n_layer=1, n_head=2, n_embd=32, block_size=48,
                cb_at="attn", num_codes=32, k=2, batch_size=8, max_iters=6, eval_interval=3, eval_seqs=8,
                warmup_iters=1, log_interval=1, cb_warmup=0, replace_every=0, learning_rate=1e-2)
    base.update(kw)
    return train.TrainConfig(**base)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    td.prepare(str(d / "data"), synthetic=True, num_stories=300, seed=0, val_every=10)
    plain = train.train(tiny_lm(d / "plain", d / "data", cb_at="none", max_iters=30))
    train.train(tiny_lm(d / "cb", d / "data", init_from=str(d / "plain" / "ckpt.pt"), max_iters=3))  # + codebooks
    return d, plain


def test_lm_training_and_checkpoint(lm):
    d, plain = lm
    saved = json.load(open(d / "plain" / "metrics.json"))
    assert {"val_loss", "val_acc", "alive", "mse", "iters", "wall_s", "tokens_per_s", "config"} <= set(saved)
    assert "state_acc" not in saved and "bayes_loss" not in saved and saved["iters"] == 30
    assert saved["val_loss"] < 0.8 * np.log(json.load(open(d / "data" / "meta.json"))["vocab_size"])  # it learned
    ckpt = common.load_checkpoint(str(d / "plain" / "ckpt.pt"))
    assert ckpt["kind"] == "lm" and ckpt["data"]["meta"]["eot"] == ckpt["model_args"]["vocab_size"] - 1
    model = model_from_checkpoint(ckpt).eval()
    val = td.fixed_windows(td.load_tokens(str(d / "data"))[1], 8, 49)
    assert model(val[:, :-1], val[:, 1:])[1].item() == pytest.approx(saved["val_loss"], rel=1e-5)
    encode, decode, _ = readout.tokenizer(ckpt)
    ids = encode("Once upon a time, the dragon")
    assert ids[0] == ckpt["data"]["meta"]["eot"] and "".join(decode(ids[1:])) == "Once upon a time, the dragon"


def test_init_from_inserts_codebooks_into_the_plain_model(lm):
    d, plain = lm
    m = train.train(tiny_lm(d / "cb0", d / "data", init_from=str(d / "plain" / "ckpt.pt"), max_iters=0))
    assert set(m["alive"]) == {"L0.attn", "all"}
    # k-means codes in a trained network: the loss moves little (random N(0, 1) codes would ruin it)
    assert m["val_loss"] < plain["val_loss"] + 0.5
    ckpt = common.load_checkpoint(str(d / "cb" / "ckpt.pt"))  # the fixture's finetune with codebooks
    assert ckpt["model_args"]["cb_at"] == "attn" and ckpt["config"]["init_from"].endswith("ckpt.pt")
    with pytest.raises(SystemExit):  # a model with codebooks already is not a base
        train.train(tiny_lm(d / "x", d / "data", init_from=str(d / "cb" / "ckpt.pt")))


def test_topics_without_codes_warns_and_exits_nonzero(lm, capsys):
    d, _ = lm
    argv = [f"--ckpt={d / 'cb' / 'ckpt.pt'}", "--device=cpu", "--samples=1", "--max_new_tokens=4", "--prompts=|Once",
            "--n_stories=30", "--controls=False"]
    with pytest.raises(SystemExit) as e:  # no code fires on 110% of a topic's tokens
        topics.main(argv + ["--rule=inout", "--min_in=1.1", "--mode=all"])
    cap = capsys.readouterr()
    assert e.value.code == 2 and cap.err.count("\n") == 1 and "no topic got a code" in cap.err
    warnings = [line for line in cap.out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 7 and all("inout rule's filter" in w and "rate_in" in w for w in warnings)
    saved = json.load(open(d / "cb" / "topics.json"))  # written before the error: which topics had none, and why
    assert all(saved[t]["all"]["n_codes"] == 0 and "inout" in saved[t]["all"]["why_none"] for t in td.TOPIC_STORY)
    assert saved["mean"]["all"]["topics_with_codes"] == 0
    with pytest.raises(SystemExit):  # every candidate costs more fluency than allowed
        topics.main(argv + ["--rule=lift", "--max_ce_ratio=0.01", "--mode=one"])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 7 and all("max_ce_ratio 0.01" in w for w in warnings)
    out = topics.main(argv + ["--rule=lift", "--topics=dragon,nothing=qqqzzz", "--mode=one", "--max_ce_ratio=10"])
    assert out["dragon"]["one"]["n_codes"] > 0 and out["nothing"]["one"]["n_codes"] == 0  # one topic is enough
    assert out["nothing"]["base_rate"] == 0 and "no code passes" in out["nothing"]["one"]["why_none"]


def test_topic_labels_come_from_the_tokens_read(tmp_path):
    """A passage whose only mention lies past the model's window is not a topic passage."""
    far = " ".join(["sand"] * 80) + " dragon."
    val = [far] * 14 + ["a dragon here."] + ["plain words."] * 5  # the odd documents go to val.bin
    write_docs(tmp_path, "\n\n", docs=[d for v in val for d in ("some training text, " * 5, v)])
    td.prepare(str(tmp_path / "data"), input=str(tmp_path / "docs.txt"), encoding="bytes", val_every=2)
    train.train(tiny_lm(tmp_path / "plain", tmp_path / "data", cb_at="none", max_iters=1))
    train.train(tiny_lm(tmp_path / "cb", tmp_path / "data", init_from=str(tmp_path / "plain" / "ckpt.pt"), max_iters=1))
    ckpt, model = readout.load_codebook_model(str(tmp_path / "cb" / "ckpt.pt"))
    cfg = topics.TopicsConfig(ckpt="x", topics="dragon=dragon")
    scan = topic_text.scan_passages(model, cfg, ckpt, readout.tokenizer(ckpt)[1])
    assert scan.n_passages == 15 and len(scan.probe) == 5  # every fourth passage probes
    assert scan.base_rate[0] == pytest.approx(1 / 15)  # the 48-token window sees "dragon" in one passage only


def test_topics_command(lm, capsys):
    d, _ = lm
    argv = [f"--ckpt={d / 'cb' / 'ckpt.pt'}", "--device=cpu", "--samples=2", "--max_new_tokens=12",
            "--prompts=|Once upon a time,", "--n_stories=30", "--max_codes=3", "--max_ce_ratio=10"]
    out = topics.main(argv + ["--sweep=1,3", "--sweep_samples=1", "--sweep_per_head=0,1", "--rule=lift"])
    saved = json.load(open(d / "cb" / "topics.json"))
    names = [t for t in saved if t not in ("mean", "matrix", "settings", "sweep")]
    assert names == list(td.TOPIC_STORY) and saved["settings"]["device"] == "cpu"
    for t in names:
        assert saved[t]["baseline"] * 4 == round(saved[t]["baseline"] * 4)  # a count of the 2 prompts x 2 samples
        assert 0 <= saved[t]["base_rate"] <= 1 and saved[t]["baseline_ce"] == saved[names[0]]["baseline_ce"] > 0
        one, every = saved[t]["one"], saved[t]["all"]
        assert one["n_codes"] == len(one["codes"]) == one["n_forced"] == 3  # at most k=2 per head, 2 heads
        assert every["n_codes"] == 2 and every["n_forced"] == 4  # one code per head, in both of its k=2 slots
        assert len({c.split(":")[0] for c in every["codes"]}) == 2 and every["why_none"] is None
        for r in (one, every):
            assert r["steered"] * 4 == round(r["steered"] * 4) and r["steered_ce"] > 0
            assert r["est_ce_ratio"] <= 10 and len(r["random"]["codes"]) == r["n_codes"]
            assert [c.split(":")[0] for c in r["random"]["codes"]] == [c.split(":")[0] for c in r["codes"]]
            assert not set(r["random"]["codes"]) & set(r["codes"])  # other codes, in the same heads
        for mode in ("one", "all"):  # the matrix's diagonal is each topic's own steered rate
            assert saved["matrix"][mode][t][t] == saved[t][mode]["steered"] and set(saved["matrix"][mode][t]) == set(names)
    for mode in ("one", "all"):
        assert out["mean"][mode]["steered"] == pytest.approx(np.mean([saved[t][mode]["steered"] for t in names]))
        m = out["mean"][mode]
        assert m["ce_ratio"] == pytest.approx(m["steered_ce"] / m["baseline_ce"]) and m["topics_with_codes"] == 7
    assert out["mean"]["best_mode"] in ("one", "all")
    # the sweep: its own baseline, then one row per (cap per head, number of codes, place), every topic in each
    cells = [(0, 0, "-")] + [(cap, n, at) for cap in (0, 1) for n in (1, 3) for at in ("all", "new")]
    assert [(r["per_head"], r["n_codes"], r["at"]) for r in saved["sweep"]] == cells
    assert saved["sweep"][0]["ce_ratio"] == 1.0 and all(set(r["per_topic"]) == set(names) for r in saved["sweep"][1:])
    assert saved["sweep"][3]["codes_used"] == 3 and saved["sweep"][7]["codes_used"] == 2  # 1 per head, 2 heads
    out = topics.main(argv + ["--per_head=1", "--at=new", "--mode=one", "--controls=False"])  # 1 per head: 2 codes
    assert all(out[t]["one"]["n_codes"] == 2 and len({c.split(":")[0] for c in out[t]["one"]["codes"]}) == 2
               and "random" not in out[t]["one"] and "all" not in out[t] for t in names)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # generation must fit in block_size 48
        topics.main([f"--ckpt={d / 'cb' / 'ckpt.pt'}", "--max_new_tokens=48", "--device=cpu"])
    assert e.value.code == 2 and "block_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        topics.main([f"--ckpt={d / 'cb' / 'ckpt.pt'}", "--at=middle", "--device=cpu"])
    assert e.value.code == 2 and "valid: all, new" in capsys.readouterr().err


def test_continuation_ce_is_the_models_own_loss(lm):
    """The fluency measure, checked against the model's next-token probabilities taken one prefix at a time."""
    d, _ = lm
    model = model_from_checkpoint(common.load_checkpoint(str(d / "cb" / "ckpt.pt"))).eval()
    gen = torch.Generator().manual_seed(0)
    y = model.generate(torch.tensor([[0, 5, 9]] * 2), 6, generator=gen)  # (2, 3 + 6)
    ce = topics.continuation_ce(model, y, 3)
    by_hand = torch.zeros(2)
    with torch.no_grad():
        for t in range(3, 9):
            by_hand -= torch.log_softmax(model(y[:, :t])[0][:, -1], -1).gather(1, y[:, t:t + 1]).squeeze(1)
    assert torch.allclose(ce, by_hand, atol=1e-4)
    # with codes forced the text changes, but the measure still scores it under the unsteered model
    site, cb = next(iter(model.codebooks().items()))
    ys = model.generate(torch.tensor([[0, 5, 9]] * 2), 6, interventions=[Intervention(site, 0, 1)],
                        generator=torch.Generator().manual_seed(0))
    full = F.cross_entropy(model(ys[:, :-1])[0][:, 2:].transpose(1, 2), ys[:, 3:], reduction="none").sum(1)
    assert torch.allclose(topics.continuation_ce(model, ys, 3), full, atol=1e-4)


def test_repeated_ngrams_by_hand():
    assert topic_text.repeated_ngrams([1, 2, 3, 1, 2, 3]) == 0.25  # 123 231 312 123: the last repeats
    assert topic_text.repeated_ngrams([1, 2, 3, 4, 5]) == 0.0
    assert topic_text.repeated_ngrams([7, 7, 7, 7, 7]) == 2 / 3
    assert topic_text.repeated_ngrams([1, 2]) == 0.0


# -----------------------------------------------------------------------------
# train.py: checkpoints, resume, bad input, codebook insertion, the optimizer


def tiny_cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), n_layer=1, n_head=2, n_embd=16, block_size=16, num_codes=16,
                batch_size=4, max_iters=4, eval_interval=2, eval_seqs=8, state_seqs=4, warmup_iters=1,
                replace_every=3, log_interval=1, cb_warmup=0, device="cpu")  # tiny: the CPU, also beside a GPU
    base.update(kw)
    return train.TrainConfig(**base)


def test_train_checkpoint_round_trip(tmp_path):
    m = train.train(tiny_cfg(tmp_path))
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["step_ms"] > 0
    for key in ("val_loss", "val_acc", "state_acc", "bayes_loss", "bayes_acc", "alive", "mse", "iters",
                "wall_s", "tokens_per_s", "config"):
        assert key in saved
    assert saved["iters"] == 4 and set(saved["alive"]) == {"L0.attn", "L0.mlp", "all"} and m["val_loss"] > 0
    ckpt = common.load_checkpoint(str(tmp_path / "ckpt.pt"))  # weights_only=True inside
    model = model_from_checkpoint(ckpt).eval()
    fsm = FSM()
    val = fsm.sample(8, 16, torch.Generator().manual_seed(ckpt["config"]["seed"] + 1))
    logits, loss, _, _ = model(val[:, :-1], val[:, 1:])
    assert loss.item() == pytest.approx(saved["val_loss"], rel=1e-5)
    again = model_from_checkpoint(common.load_checkpoint(str(tmp_path / "ckpt.pt"))).eval()
    assert torch.equal(again(val[:, :-1])[0], logits)


def test_resume_gives_the_same_model(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # a constant learning rate: with decay_lr the schedule depends on max_iters, which resume changes.
    # On the CPU even with a GPU present: bitwise equality is a CPU property (CUDA's index_add_ and
    # LayerNorm backward add in a varying order).
    train.train(tiny_cfg(a, max_iters=6, decay_lr=False, device="cpu"))
    train.train(tiny_cfg(b, max_iters=4, decay_lr=False, device="cpu"))
    cfg, given = common.parse_args([f"--out_dir={b}", "--resume=True", "--max_iters=6"], train.TrainConfig,
                                   train.PRESETS)
    train.train(cfg, given)
    sa = torch.load(a / "ckpt.pt", weights_only=True)
    sb = torch.load(b / "ckpt.pt", weights_only=True)
    assert sb["iter_num"] == 6
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key


def run_train(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=120)


@pytest.mark.parametrize("preset", sorted(train.PRESETS))
def test_every_preset_passes_the_checks(preset):
    cfg, _ = common.parse_args([f"--config={preset}"], train.TrainConfig, train.PRESETS)
    train.check(cfg)
    assert dataclasses.asdict(cfg) == {**dataclasses.asdict(train.TrainConfig()), **train.PRESETS[preset]}


@pytest.mark.parametrize("args,msg", [
    (["--foo=1"], "unknown flag --foo; valid: config, out_dir"),
    (["--k=abc"], "--k=abc: expected int"),
    (["--num_codes=8", "--k=9"], "--k=9: must be <= num_codes=8"),
    (["--cb_at=everything"], "--cb_at=everything: valid: none, attn, mlp, attn+mlp"),
    (["--config=huge"], "unknown preset; valid: fsm, fsm_paper"),
    (["--compile=maybe"], "expected True or False"),
    (["--cb_layers=0,9"], "layers must be in 0..1"),
    (["max_iters=3"], "expected --key=value"),
])
def test_bad_config_is_one_line_error(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cfg, _ = common.parse_args(args, train.TrainConfig, train.PRESETS)
        train.check(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


@pytest.mark.parametrize("parse,argv,want", [
    (lambda a: common.parse_args(a, train.TrainConfig, train.PRESETS, doc="train doc"), ["--k=2", "--help"],
     ["train doc", "presets (--config=NAME, the first is the default): fsm, fsm_paper", "--config='fsm'", "--k=1"]),
    (browse.parse_args, ["-h"], ["python browse.py --ckpt=", "flags and defaults: --ckpt='' --device='auto'"]),
    (steer.parse_args, ["show", "--help"], ["python steer.py show CODE --ckpt=PATH", "--top=10 --context=24"]),
    (steer.parse_args, ["--help"], ["python steer.py states", "flags and defaults: --ckpt=''", "--top_k=0"]),
], ids=["train", "browse", "steer show", "steer"])
def test_help_prints_the_flags_and_their_defaults(parse, argv, want, capsys):
    """--help goes through helpers.common for every script: the text, then every flag with its default."""
    with pytest.raises(SystemExit) as e:
        parse(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(w in out for w in want), out


def test_a_bool_flag_alone_means_true(capsys):
    assert common.parse_flags(["--synthetic", "--n=2"], dict(synthetic=False, n=1), "")[0] == dict(synthetic=True, n=2)
    with pytest.raises(SystemExit):
        common.parse_flags(["--n"], dict(n=1), "")
    assert "bad argument '--n': expected --key=value" in capsys.readouterr().err

@pytest.mark.slow
def test_bad_checkpoint_is_one_line_error_and_kept(tmp_path):
    r = run_train(f"--out_dir={tmp_path}", "--resume=True")
    assert r.returncode == 2 and "no checkpoint at" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = run_train(f"--out_dir={tmp_path}", "--resume=True")
    assert r.returncode == 2 and "unreadable" in r.stderr and r.stderr.count("\n") == 1
    assert (tmp_path / "ckpt.pt").read_bytes() == b"not a checkpoint"  # never overwritten


def test_insert_codebooks_into_a_trained_model(tmp_path):
    """cb_warmup: the plain weights carry over unchanged, the codes are k-means centroids."""
    cfg = tiny_cfg(tmp_path, cb_warmup=3, max_iters=5, replace_every=0, num_codes=8)
    train.train(cfg)
    ckpt = common.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["model_args"]["cb_at"] == "attn+mlp"
    plain = train.build_model(cfg, 11, cb_at="none")
    seqs = FSM().sample(4, 16, torch.Generator().manual_seed(0))
    idx = seqs[:, :-1]
    torch.manual_seed(0)
    with_cb = train.insert_codebooks(plain, cfg, lambda: seqs, distributed.from_env("cpu"))
    for name, p in plain.state_dict().items():
        assert torch.equal(p, with_cb.state_dict()[name])
    cache = {}
    with_cb.eval()(idx, activations=cache)
    cb = with_cb.codebooks()["L0.attn"]
    cb(cache["L0.attn.in"])
    kmeans_mse = cb.last_mse
    with torch.no_grad():
        cb.codebook.normal_()  # the default N(0, 1) init, same LN
    cb(cache["L0.attn.in"])
    assert kmeans_mse < 0.2 * cb.last_mse


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-steps of batch B give the update of one step of 2B, codebooks included: their
    reconstruction gradient is added inside the backward, outside the loss, so train_step scales it too.
    Plain SGD with lr 1, so that the update is the gradient itself (Adam's first step is about its sign)."""
    model = tiny_model()
    x = FSM().sample(8, 16, torch.Generator().manual_seed(0))
    runs = []
    for batches in ([x], [x[:4], x[4:]]):
        m = copy.deepcopy(model)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        loss, mse = train.train_step(m, torch.optim.SGD(m.parameters(), lr=1.0), batches, grad_clip=1e9)
        runs.append((m, before, loss, mse))
    (a, before, la, ma), (b, _, lb, mb) = runs
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        update = before[name] - pa.detach()
        assert update.abs().sum() > 0, name  # every parameter moves, the codes and their LayerNorms too
        torch.testing.assert_close(before[name] - pb.detach(), update, rtol=1e-4, atol=1e-7, msg=name)
    assert la.item() == pytest.approx(lb.item(), rel=1e-6) and ma.item() == pytest.approx(mb.item(), rel=1e-5)
    for ca, cb in zip(a.codebooks().values(), b.codebooks().values()):
        assert torch.equal(ca.uses_since_read, cb.uses_since_read) and ca.uses_since_read.sum() == 8 * 15 * ca.groups


def test_weight_decay_only_on_the_weights_of_linears_and_embeddings():
    """By name, not by shape: the codebooks' LayerNorm affine is (G, d), yet a LayerNorm, so no decay."""
    model = tiny_model()
    cfg = train.TrainConfig(learning_rate=5e-3, cb_lr=1e-2, weight_decay=0.1)
    names = {p: n for n, p in model.named_parameters()}
    decay, rest, codes = ({names[p] for p in g["params"]} for g in train.make_optimizer(model, cfg, "cpu").param_groups)
    weights = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding))}
    assert decay == weights & set(names.values()) and "transformer.wte.weight" in decay  # tied with lm_head
    assert codes == {n for n in names.values() if n.endswith(".codebook")} and len(codes) == 4
    assert rest == set(names.values()) - decay - codes
    assert {"transformer.h.0.attn.codebook.ln_weight", "transformer.h.1.mlp.codebook.ln_bias",
            "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.bias"} <= rest
    groups = train.make_optimizer(model, cfg, "cpu").param_groups
    assert [(g["weight_decay"], g["lr_mult"]) for g in groups] == [(0.1, 1.0), (0.0, 1.0), (0.0, 2.0)]


def test_train_step_keeps_the_codebooks_own_mse_weight():
    """A codebook's mse_weight w scales its codes' reconstruction gradient; split over micro-batches, the
    update is that of one batch with the same w, and w is the user's again after the step."""
    x = FSM().sample(8, 16, torch.Generator().manual_seed(0))
    model = tiny_model()
    for cb in model.codebooks().values():
        cb.mse_weight = 0.25
    by_hand = copy.deepcopy(model)
    by_hand(x[:, :-1], x[:, 1:])[1].backward()  # the loss, and inside the backward 0.25 x the codes' MSE
    train.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), [x[:4], x[4:]], grad_clip=1e9)
    for (name, p), q in zip(by_hand.named_parameters(), model.parameters()):
        if name.endswith(".codebook"):
            torch.testing.assert_close(p.detach() - q.detach(), p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert [cb.mse_weight for cb in model.codebooks().values()] == [0.25] * 4


def test_inserting_codebooks_keeps_the_adam_state_of_the_weights(tmp_path, monkeypatch):
    """At cb_warmup the new model's weights keep their Adam moments and step count (at near-peak learning
    rate a fresh Adam would take sign-sized steps); the codes start without state."""
    seen, train_step = [], train.train_step

    def recording(model, optimizer, *args):
        def state():
            return {n: {k: v.clone() for k, v in optimizer.state[p].items()}
                    for n, p in model.named_parameters() if p in optimizer.state}
        before = state()
        out = train_step(model, optimizer, *args)
        seen.append((before, state()))
        return out

    monkeypatch.setattr(train, "train_step", recording)
    train.train(tiny_cfg(tmp_path, cb_warmup=2, max_iters=3, replace_every=0))
    (_, after_2), (before_3, _) = seen[1], seen[2]  # codebooks inserted between the 2nd and 3rd steps
    assert set(before_3) == set(after_2) and len(after_2) > 0
    for name, s in after_2.items():
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"} and float(s["step"]) == 2.0
        for key, value in s.items():
            assert torch.equal(before_3[name][key], value), (name, key)
    assert not any(n.endswith(".codebook") for n in before_3) and any(n.endswith(".codebook") for n in seen[2][1])


def test_resume_loads_an_optimizer_state_with_the_old_decay_groups():
    """Checkpoints from before the decay groups went by name have the codebooks' LayerNorms in the decay
    group, so other group sizes: each parameter still gets its own Adam state back."""
    model, cfg = tiny_model(), train.TrainConfig()
    x = FSM().sample(4, 16, torch.Generator().manual_seed(0))
    trained = train.make_optimizer(model, cfg, "cpu")
    train.train_step(model, trained, [x], grad_clip=1.0)
    named = list(model.named_parameters())
    old = torch.optim.AdamW([dict(params=[p for n, p in named if p.dim() >= 2 and not n.endswith(".codebook")]),
                             dict(params=[p for n, p in named if p.dim() < 2]),
                             dict(params=[p for n, p in named if n.endswith(".codebook")])])
    old.state.update(trained.state)
    resumed = train.make_optimizer(model, cfg, "cpu")
    checkpoints.load_optimizer_state(resumed, model, copy.deepcopy(old.state_dict()))
    for name, p in named:
        for key, value in trained.state[p].items():
            assert torch.equal(resumed.state[p][key], value), (name, key)
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.1, 0.0, 0.0]  # this version's groups


def test_resume_restores_the_gpus_generator(monkeypatch):
    """Dead codes are drawn on the run's device: a GPU run's checkpoint keeps that device's generator and a
    resumed run on a GPU restores it (checked here with the CUDA calls faked; checkpoints without it load)."""
    state, calls = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(("get", device)) or state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append(("set", device, s)))
    saved = checkpoints.rng_states("cuda:1")
    assert calls == [("get", "cuda:1")] and torch.equal(saved["cuda_rng"], state)
    assert torch.equal(saved["torch_rng"], torch.get_rng_state())
    torch.manual_seed(5)
    checkpoints.restore_rng_states(saved, "cuda:1")
    assert calls[-1][:2] == ("set", "cuda:1") and torch.equal(calls[-1][2], state)
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])
    calls.clear()
    assert set(checkpoints.rng_states("cpu")) == {"torch_rng"} and calls == []
    checkpoints.restore_rng_states(dict(torch_rng=saved["torch_rng"]), "cuda:1")  # an older or a CPU checkpoint
    checkpoints.restore_rng_states(saved, "cpu")  # a GPU checkpoint resumed on the CPU
    assert calls == []


def test_too_short_train_bin_is_one_line_error(tmp_path, capsys):
    """get_batch draws offsets below len - (block_size + 1): a train.bin needs one token more than a window."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps(dict(vocab_size=50, eot=49)))
    np.arange(40, dtype=np.uint16).tofile(data / "val.bin")
    for n, ok in ((17, False), (18, True)):  # block_size 16: windows of 17
        np.arange(n, dtype=np.uint16).tofile(data / "train.bin")
        cfg = tiny_lm(tmp_path / "out", data, block_size=16, max_iters=1, eval_seqs=2, cb_at="none")
        if ok:
            assert train.train(cfg)["iters"] == 1
            continue
        with pytest.raises(SystemExit) as e:
            train.train(cfg)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert f"{data / 'train.bin'} has 17 tokens" in err and "block_size + 1 = 17" in err


def test_metrics_json_is_written_atomically(tmp_path, monkeypatch):
    """A crash while writing metrics.json leaves the last one whole, as a checkpoint is."""
    (tmp_path / "metrics.json").write_text('{"val_loss": 1.0}')

    def crash(obj, f, **kw):
        f.write('{"val_lo')
        raise OSError("No space left on device")

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(OSError):
        train.train(tiny_cfg(tmp_path, max_iters=1))
    assert (tmp_path / "metrics.json").read_text() == '{"val_loss": 1.0}'


def test_bf16_training_runs(tmp_path):
    m = train.train(tiny_cfg(tmp_path, dtype="bfloat16", max_iters=2))
    assert math.isfinite(m["val_loss"]) and m["config"]["dtype"] == "bfloat16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_on_a_gpu(tmp_path):
    """The GPU path: FSM walks drawn on the device, a resumed run close to an unbroken one (CUDA's
    scatter-adds are not bitwise reproducible), the checkpoint loads on the CPU. Dead codes are replaced
    at steps 2, 4 (before the stop at 5) and 6 (after it) from the GPU's generator: the resumed run
    continues it, so both runs end with the same generator state."""
    a, b = tmp_path / "a", tmp_path / "b"
    ma = train.train(tiny_cfg(a, max_iters=8, decay_lr=False, replace_every=2, device="cuda"))
    train.train(tiny_cfg(b, max_iters=5, decay_lr=False, replace_every=2, device="cuda"))
    cfg, given = common.parse_args([f"--out_dir={b}", "--resume=True", "--max_iters=8"], train.TrainConfig,
                                   train.PRESETS)
    mb = train.train(cfg, given)
    assert ma["device"] == "cuda" and abs(ma["val_loss"] - mb["val_loss"]) < 1e-2
    ca, cb = (common.load_checkpoint(str(d / "ckpt.pt")) for d in (a, b))
    assert torch.equal(ca["cuda_rng"], cb["cuda_rng"])
    model = model_from_checkpoint(cb)
    assert next(model.parameters()).device.type == "cpu"


# -----------------------------------------------------------------------------
# readout.py and steer.py: reading and steering a TokFSM model


def save_tiny(path, kind="fsm", k=1):
    cfg = train.TrainConfig(out_dir=str(path.parent), num_states=12, num_edges=3, n_layer=2, n_head=2, n_embd=32,
                            block_size=32, num_codes=64, k=k)
    torch.manual_seed(0)
    fsm = FSM(cfg.num_states, cfg.num_edges, seed=cfg.fsm_seed)
    model = train.build_model(cfg, fsm.vocab_size)
    opt = train.make_optimizer(model, cfg, "cpu")
    common.save_checkpoint(str(path), dict(
        model=model.state_dict(), optimizer=opt.state_dict(), iter_num=0, config=dataclasses.asdict(cfg),
        model_args=dataclasses.asdict(model.config), data_rng=torch.Generator().get_state(),
        torch_rng=torch.get_rng_state(), wall_s=0.0, kind=kind,
        fsm=dict(num_states=cfg.num_states, num_edges=cfg.num_edges, seed=cfg.fsm_seed)))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "ckpt.pt")


def run_cli(argv, capsys):
    """main(argv) that must fail: -> its stderr line."""
    with pytest.raises(SystemExit) as e:
        steer.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_precision_recall_by_hand():
    # position:  0  1  2   3  4  5  6   7
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 0, 0])[:, None]  # (P, k=1)
    labels = torch.tensor([0, 0, -1, 0, 1, 1, -1, -1])  # pattern 0 = {0, 1, 3}, pattern 1 = {4, 5}, pattern 2 never
    lab, code, tp, fired, size = steer.pair_counts(ids, labels, 3, 3)
    assert fired.tolist() == [5, 2, 1] and size.tolist() == [3, 2, 0]
    assert sorted(zip(lab.tolist(), code.tolist(), tp.tolist())) == [(0, 0, 2), (0, 1, 1), (1, 1, 1), (1, 2, 1)]
    code, prec, rec = steer.best_codes(ids, labels, 3, 3)
    # pattern 0: code 0 has P 2/5, R 2/3, F1 1/2; code 1 has P 1/2, R 1/3, F1 2/5 -> code 0
    # pattern 1: code 1 has P 1/2, R 1/2, F1 1/2; code 2 has P 1, R 1/2, F1 2/3 -> code 2
    assert code.tolist() == [0, 2, -1]
    assert torch.allclose(prec, torch.tensor([0.4, 1.0, 0.0], dtype=torch.double))
    assert torch.allclose(rec, torch.tensor([2 / 3, 0.5, 0.0], dtype=torch.double))


def test_flat_ids_separate_groups():
    codes = torch.tensor([[[[3], [3]]]])  # (B=1, T=1, G=2, k=1): code 3 in both heads
    assert readout.flat_ids(codes, 10).tolist() == [[3, 13]]
    assert readout.code_name("L1.attn", 13, 10) == "L1.attn.h1:3"


def test_code_scores_are_the_searchs_scores():
    """readout.code_scores: each selected code's cosine with the input in LN space (by hand), best slot
    first as the search ranks them, the same (to rounding) in token chunks of any size."""
    torch.manual_seed(3)
    layer = CodebookLayer(dim=12, num_codes=40, k=3, groups=3).eval()
    acts = torch.randn(2 * 5, 12)
    _, ids = layer(acts.view(2, 5, 12))
    got = readout.code_scores(layer, acts, ids)
    xn = layer.normalize(acts)
    unit = layer.codebook / layer.codebook.norm(dim=-1, keepdim=True)
    want = torch.stack([(xn[p, g] * unit[g, ids.view(10, 3, 3)[p, g]]).sum(-1) for p in range(10) for g in range(3)])
    assert torch.allclose(got.view(30, 3), want.detach(), atol=1e-5)
    assert (got[..., :-1] >= got[..., 1:]).all()
    assert torch.allclose(readout.code_scores(layer, acts, ids, max_elems=1), got, rtol=1e-6, atol=1e-6)


def test_neuron_threshold_by_hand():
    # unit 0 on pattern 0 = {0, 1, 3} (values 5, 1, 3), target recall 2/3 -> n = 2, threshold 3:
    # fires where a >= 3 = {0, 2, 3, 5}, 2 of them in M: precision 2/4. Sign -a: threshold -3, fires where
    # a <= 3 = {1, 3, 4}, 2 in M: precision 2/3. Unit 1 is unit 0 reversed in time.
    a = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0, 6.0])
    acts = torch.stack([a, a.flip(0)], 1)  # (P, H=2)
    labels = torch.tensor([0, 0, -1, 0, -1, -1])
    sorted_all = acts.T.contiguous().sort(1).values
    pp, rp, pn, rn = steer.neuron_precision(acts, sorted_all, labels, torch.tensor([2 / 3], dtype=torch.double))
    assert pp[0, 0].item() == pytest.approx(0.5) and rp[0, 0].item() == pytest.approx(2 / 3)
    assert pn[0, 0].item() == pytest.approx(2 / 3) and rn[0, 0].item() == pytest.approx(2 / 3)
    # unit 1 = [6, 2, 3, 4, 1, 5]: values on M 6, 2, 4 -> threshold 4, fires at {0, 3, 5}, 2 in M: precision 2/3
    assert pp[0, 1].item() == pytest.approx(2 / 3)
    # recall 1: the threshold is the smallest value on M (1 for unit 0): every position fires
    pp, rp, _, _ = steer.neuron_precision(acts, sorted_all, labels, torch.tensor([1.0], dtype=torch.double))
    assert pp[0, 0].item() == pytest.approx(3 / 6) and rp[0, 0].item() == 1.0


def test_neuron_threshold_many_patterns_match_loop():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(200, 5, generator=g)
    labels = torch.randint(-1, 4, (200,), generator=g)
    recall = torch.tensor([0.1, 0.5, 0.77, 1.0], dtype=torch.double)
    pp, _, pn, _ = steer.neuron_precision(acts, acts.T.contiguous().sort(1).values, labels, recall)
    for s in range(4):  # the same numbers from a plain loop
        m = labels == s
        n = math.ceil(recall[s].item() * m.sum().item() - 1e-6)
        for h in range(5):
            for sign, p in ((1, pp), (-1, pn)):
                x = sign * acts[:, h]
                thr = x[m].sort(descending=True).values[n - 1]
                fired = x >= thr
                assert p[s, h].item() == pytest.approx((fired & m).sum().item() / fired.sum().item())


def test_jsd():
    p = torch.tensor([0.2, 0.3, 0.5])
    q = torch.tensor([0.6, 0.1, 0.3])
    assert steer.jsd(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert steer.jsd(p, q).item() == pytest.approx(steer.jsd(q, p).item())
    assert steer.jsd(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log(2))
    known = 0.5 * math.log(4 / 3) + 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    assert steer.jsd(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item() == pytest.approx(known)


def test_successor_starts():
    fsm = FSM(12, 3, seed=1)
    starts = steer.successor_starts(fsm)
    assert starts.shape == (12, 10) and starts.sum(1).le(3).all() and starts.sum(1).ge(1).all()
    for x in range(12):  # the same from the FSM's rows, one state at a time
        want = {int(fsm.state_digits[y, 0]) for y in range(12) if fsm.transitions[x, y] > 0}
        assert set(starts[x].nonzero().squeeze(1).tolist()) == want


def test_forcing_a_code_equals_a_codebook_that_only_has_it(ckpt):
    model = model_from_checkpoint(common.load_checkpoint(ckpt)).eval()
    idx = torch.tensor([[10, 1, 2, 0, 3, 1, 1]])
    base, _, codes, _ = model(idx)
    c = next(i for i in range(64) if not (codes["L1.mlp"] == i).any())  # a code the model does not pick here
    forced, _, fcodes, _ = model(idx, interventions=[Intervention("L1.mlp", 0, c)])
    assert (fcodes["L1.mlp"] == c).all()
    assert not torch.allclose(forced, base)
    other = copy.deepcopy(model)  # every code of L1.mlp replaced by code c: the search can only return c
    with torch.no_grad():
        cb = other.codebooks()["L1.mlp"].codebook
        cb.copy_(cb[:, c:c + 1].expand_as(cb))
    assert torch.allclose(other(idx)[0], forced, atol=1e-5)
    # forcing only the last two positions leaves the earlier ones as they were
    part, _, pcodes, _ = model(idx, interventions=[Intervention("L1.mlp", 0, c, positions=(-2, -1))])
    assert torch.equal(pcodes["L1.mlp"][:, :-2], codes["L1.mlp"][:, :-2]) and (pcodes["L1.mlp"][:, -2:] == c).all()
    assert torch.allclose(part[:, :-2], base[:, :-2], atol=1e-6)


def test_generate_follows_the_forced_distribution(ckpt, capsys):
    model = model_from_checkpoint(common.load_checkpoint(ckpt)).eval()
    idx = torch.tensor([[10, 0, 1, 0, 5]])  # BOS + the prompt "0105"
    base = model(idx)[0][0, -1].argmax().item()
    moved = [c for c in range(64) if model(idx, interventions=[Intervention("L1.mlp", 0, c)])[0][0, -1].argmax() != base]
    assert moved, "no code of L1.mlp changes the greedy next token"
    c = moved[0]
    want = model(idx, interventions=[Intervention("L1.mlp", 0, c)])[0][0, -1].argmax().item()
    out = steer.main(["generate", f"--ckpt={ckpt}", "--prompt=0105", f"--force=L1.mlp:{c}", "--top_k=1", "--n=1",
                      "--max_new_tokens=1", "--device=cpu"])
    _, decode, _ = readout.tokenizer(common.load_checkpoint(ckpt))
    assert out["baseline"]["samples"][0][-1] == decode([base])[0]  # greedy: the argmax, unforced
    assert out["steered"]["samples"][0][-1] == decode([want])[0]  # and forced
    capsys.readouterr()


def test_patching_own_codes_changes_nothing(tmp_path):
    model = model_from_checkpoint(common.load_checkpoint(save_tiny(tmp_path / "ckpt.pt", k=2))).eval()
    x = torch.tensor([[10, 1, 2, 0, 3], [10, 0, 4, 1, 1], [10, 1, 1, 0, 2]])
    logits, _, codes, _ = model(x)
    last = {s: c[:, -1] for s, c in codes.items()}  # (B, G, k)
    probs, greedy = steer.patched_run(model, x, last, list(last), 2, 10)
    assert torch.allclose(probs, torch.softmax(logits[:, -1], -1), atol=1e-6)
    assert greedy.shape == (3, 2) and (greedy < 10).all()
    other = {s: c.flip(0) for s, c in last.items()}  # the codes of other rows do change the output
    assert not torch.allclose(steer.patched_run(model, x, other, list(last), 0, 10)[0], probs)


def test_states_patch_usage_search_generate_run(ckpt, capsys):
    common = [f"--ckpt={ckpt}", "--batch_size=16", "--device=cpu"]
    out = steer.main(["states", "--n_seqs=24", "--min_count=1"] + common)
    assert set(out["sites"]) == {"L0.attn", "L0.mlp", "L1.attn", "L1.mlp"}  # the best site by mean F1
    assert out["site"] == max(out["sites"], key=lambda s: out["sites"][s]["state"]["code_f1"])
    assert len(out["per_state"]) == 12 and out["device"] == "cpu"  # the table's means are the per-state rows'
    for key in ("precision", "recall", "neuron_precision"):
        mean = np.mean([row[key] for row in out["per_state"]])
        assert mean == pytest.approx(out["code_" + key if key != "neuron_precision" else key], abs=1e-4), key
    out = steer.main(["patch", "--pairs=30", "--ctx_states=3"] + common)
    assert out["device"] == "cpu" and out["jsd"]["none"] == 1.0 and {"all", "all_mlp", "all_attn", "L1.mlp"} <= set(out["jsd"])
    assert out["force_success"] * 30 == pytest.approx(round(out["force_success"] * 30))  # a count of 30 trials
    out = steer.main(["usage", "--n_seqs=8"] + common)
    hist = out["L0.mlp"]["histogram"]
    assert sum(hist.values()) == 64 and out["L0.mlp"]["alive"] == 1 - hist["0"] / 64  # every code in one bin
    # BOS is at position 0 of every sequence, where every codebook sees the same input: recall 1
    out = steer.main(["search", r"\|", "--n_seqs=8"] + common)
    assert out["matches"] == 8 and out["codes"][0]["recall"] == 1.0
    out = steer.main(["show", out["codes"][0]["code"], "--n_seqs=8", "--top=3"] + common)
    assert out["firings"] >= 8 and "[|]" in out["top"][0]["text"]
    out = steer.main(["generate", "--prompt=0105", "--force=L1.mlp:3", "--at=new", "--n=2", "--max_new_tokens=6"]
                     + common)
    assert len(out["steered"]["samples"]) == 2 and out["steered"]["samples"][0].startswith("| 01 05")
    capsys.readouterr()


def test_cli_errors(ckpt, tmp_path, capsys):
    assert "no checkpoint" in run_cli(["states", f"--ckpt={tmp_path}/nothing.pt"], capsys)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "unreadable" in run_cli(["usage", f"--ckpt={tmp_path}/junk.pt"], capsys)
    assert "bad code address" in run_cli(["show", "L1.mlp", f"--ckpt={ckpt}"], capsys)
    assert "out of range" in run_cli(["show", "L1.mlp:64", f"--ckpt={ckpt}"], capsys)
    assert "no codebook at L7.mlp" in run_cli(["generate", "--force=L7.mlp:1", f"--ckpt={ckpt}"], capsys)
    assert "more than k=1" in run_cli(["generate", "--force=L1.mlp:1,L1.mlp:2", f"--ckpt={ckpt}"], capsys)
    err = run_cli(["states", "--nope=1", f"--ckpt={ckpt}"], capsys)
    assert "unknown flag --nope" in err and "n_seqs" in err
    assert "expected int" in run_cli(["states", "--n_seqs=many", f"--ckpt={ckpt}"], capsys)
    assert "commands:" in run_cli(["frobnicate", f"--ckpt={ckpt}"], capsys)
    assert "--ckpt=PATH is required" in run_cli(["usage"], capsys)
    lm = save_tiny(tmp_path / "lm.pt", kind="lm")
    assert "needs an FSM checkpoint" in run_cli(["states", f"--ckpt={lm}"], capsys)


def test_steer_topics_points_to_topics_py(ckpt, capsys):
    assert "python topics.py" in run_cli(["topics", f"--ckpt={ckpt}"], capsys)


# -----------------------------------------------------------------------------
# browse.py: the HTML code browser


class PageParser(html.parser.HTMLParser):
    """Tags, scripts and links of a page: what the structure checks need."""
    VOID = {"meta", "input", "br", "img", "link", "hr", "area", "base", "col", "embed", "source", "track", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.bad, self.data_blocks, self.scripts, self.links, self.csp = [], [], [], 0, [], None
        self.in_data = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy":
            self.csp = a["content"]
        if tag == "script":
            self.scripts += 1
            self.in_data = a.get("type") == "application/json"
            if self.in_data:
                self.data_blocks.append("")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.bad.append(tag)
        self.in_data = False

    def handle_data(self, data):
        if self.in_data:
            self.data_blocks[-1] += data


def parse_page(path):
    p = PageParser()
    p.feed(open(path, encoding="utf-8").read())
    p.close()
    return p


def page_of(path):
    """The structure checks every page must pass -> its embedded data."""
    p = parse_page(path)
    assert not p.bad and not p.stack, (p.bad, p.stack)  # every tag closed, in order
    assert len(p.data_blocks) == 1 and p.scripts == 2  # one data block, one script
    assert p.csp and "default-src 'none'" in p.csp and "script-src 'sha256-" in p.csp
    assert not [u for u in p.links if re.match(r"\s*(https?:)?//", u)], p.links  # nothing loads from outside
    return json.loads(p.data_blocks[0])


def decoded_codes(site):
    """A site's codes as the page holds them: (P, G, k)."""
    a = np.frombuffer(base64.b64decode(site["codes"]), dtype="<u4" if site["width"] == 4 else "<u2")
    return torch.from_numpy(a.astype(np.int64)).view(-1, site["groups"], site["k"])


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A page of a tiny k=2 FSM model (every code of the tiny model forced), and its flags."""
    path = save_tiny(tmp_path_factory.mktemp("browse") / "ckpt.pt", k=2)
    flags = [f"--ckpt={path}", "--device=cpu", "--n_seqs=12", "--batch_size=5", "--seed=3"]
    steer.main(["states", "--min_count=1"] + flags)  # the TokFSM view draws these two
    steer.main(["patch", "--pairs=20", "--ctx_states=3"] + flags[:2])
    out = browse.main(flags + ["--top=4", "--effect_codes=6", "--effect_seqs=2"])
    return path, flags, out


def test_browse_page_holds_what_steer_computes(page, capsys):
    path, flags, out = page
    data = page_of(out)
    assert out == os.path.join(os.path.dirname(path), "browse.html")  # beside the checkpoint
    usage = steer.main(["usage"] + flags)
    assert {s["name"]: s["usage"] for s in data["sites"]} == usage
    ckpt, model = readout.load_codebook_model(path)
    tokens = torch.tensor(data["seqs"])
    assert torch.equal(tokens, steer.sequences(dict(n_seqs=12, seed=3), ckpt, model))
    codes = readout.run(model, tokens, 5)[0]
    L = tokens.shape[1]
    for site in data["sites"]:
        assert torch.equal(decoded_codes(site), codes[site["name"]].reshape(-1, site["groups"], site["k"]))
        f = torch.tensor(site["firings"])
        for flat in (int(f.argmax()), int(f.argmin()), 7):  # the busiest code, a quiet or dead one, another
            name = readout.code_name(site["name"], flat, site["num_codes"])
            shown = steer.main(["show", name, "--top=4"] + flags)
            assert shown["firings"] == site["firings"][flat]
            want = [v for r in shown["top"] for v in (r["seq"] * L + r["pos"], r["score"])]
            assert site["top"].get(str(flat), []) == want, name
    found = steer.main(["search", r"\|0", "--top=100"] + flags)["codes"]
    firings = {readout.code_name(s["name"], c, s["num_codes"]): n for s in data["sites"] for c, n in enumerate(s["firings"])}
    assert all(r["fired"] == firings[r["code"]] for r in found)
    assert len(data["effects"]) == 6 and all(len(e["up"]) == len(e["down"]) == 5 for e in data["effects"].values())
    states = json.load(open(os.path.join(os.path.dirname(path), "states.json")))
    assert data["states"] == states and list(data["effects"])[0] == states["per_state"][0]["code"]  # named first
    capsys.readouterr()


def test_browse_builds_the_same_bytes_twice(page, tmp_path, capsys):
    path, flags, out = page
    again = browse.main(flags + ["--top=4", "--effect_codes=6", "--effect_seqs=2", f"--out={tmp_path / 'b.html'}"])
    assert open(out, "rb").read() == open(again, "rb").read()
    assert f"({os.path.getsize(again)} bytes)" in capsys.readouterr().out  # the page's size, printed


def test_browse_tokens_are_text_not_markup():
    tricky = ["</script>", "<b>", "&amp;", "</SCRIPT >", "\u2028"]
    block = browse.json_block(dict(vocab=tricky))
    assert "<" not in block and ">" not in block and "&" not in block and json.loads(block) == dict(vocab=tricky)
    page = browse.render_page(dict(meta=dict(ckpt="x</title><b>y"), vocab=tricky))
    p = PageParser()
    p.feed(page)
    assert len(p.data_blocks) == 1 and json.loads(p.data_blocks[0])["vocab"] == tricky and p.scripts == 2
    assert "<b>" not in page.split("<script")[0].split("<title>")[1]  # the title escaped as well
    assert "</" not in browse.read_page()[1]  # the page's own script cannot end its element early


def test_browse_bad_input_is_one_line_error(page, tmp_path, capsys):
    path = page[0]
    for argv, msg in (([], "--ckpt=PATH is required"), ([f"--ckpt={path}", "--nope=1"], "unknown flag --nope"),
                      ([f"--ckpt={path}", "--n_seqs=0"], "must be >= 1"),
                      ([f"--ckpt={tmp_path}/none.pt"], "no checkpoint")):
        with pytest.raises(SystemExit) as e:
            browse.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and msg in err, (argv, err)
    with pytest.raises(SystemExit) as e:  # the page's own file, read at run time
        browse.read_page(str(tmp_path / "browse_page.html"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "needs browse_page.html beside it" in err, err


@pytest.mark.slow
def test_browse_language_model_page(lm, tmp_path, capsys):
    d, _ = lm
    out = browse.main([f"--ckpt={d / 'cb' / 'ckpt.pt'}", "--device=cpu", "--n_seqs=6", f"--out={tmp_path / 'lm.html'}"])
    data = page_of(out)
    assert data["meta"]["kind"] == "lm" and data["states"] is None and len(data["seqs"]) == 6
    val = td.load_tokens(str(d / "data"))[1]
    assert data["seqs"] == td.fixed_windows(val, 6, 48).tolist()  # windows of val.bin
    topics_json = d / "cb" / "topics.json"
    assert data["topics"] == (json.load(open(topics_json)) if topics_json.exists() else None)
    with pytest.raises(SystemExit):
        browse.main([f"--ckpt={d / 'cb' / 'ckpt.pt'}", f"--data_dir={tmp_path}/none"])
    assert "--data_dir" in capsys.readouterr().err


def chromium(url, tmp_path):
    """Headless Chromium with the network off: -> (the DOM after the page's script ran, the browser's log)."""
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--virtual-time-budget=10000", "--dump-dom", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, r.stderr


class DomRows(html.parser.HTMLParser):
    """From a dumped DOM: the body's markers, the search results' data attributes, the text of each element with
    an id, and the tags inside the story."""
    def __init__(self):
        super().__init__()
        self.body, self.hits, self.text, self.story_tags, self.stack = {}, [], {}, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if "data-f1" in a:
            self.hits.append(a)
        if "story" in self.stack:
            self.story_tags.append(tag)
        if tag not in PageParser.VOID:
            self.stack.append(a.get("id"))
            self.text.setdefault(a.get("id"), "")

    def handle_endtag(self, tag):
        if tag not in PageParser.VOID:
            self.stack.pop()

    def handle_data(self, data):
        for i in set(self.stack) - {None}:
            self.text[i] += data


@pytest.mark.slow
def test_browse_in_headless_chromium(page, tmp_path, capsys):
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium package)")
    path, flags, out = page
    for regex in (r"\|0", r"2[01]"):
        dom, log = chromium(f"file://{out}#search={urllib.parse.quote(regex)}&min=0", tmp_path)
        p = DomRows()
        p.feed(dom)
        assert p.body.get("data-ready") == "1" and p.body.get("data-view") == "search" and "data-errors" not in p.body
        assert "Content Security Policy" not in log and "Uncaught" not in log, log[-2000:]
        found = steer.main(["search", regex, "--top=100"] + flags)
        assert int(p.text["matches"]) == found["matches"]
        got = [dict(code=h["data-code"], precision=float(h["data-precision"]), recall=float(h["data-recall"]),
                    f1=float(h["data-f1"]), fired=int(h["data-fired"])) for h in p.hits]
        assert got == found["codes"]  # the same codes, the same order, the same floats
    dom, log = chromium(f"file://{out}#search={urllib.parse.quote('2')}&min=0.5", tmp_path)
    p = DomRows()
    p.feed(dom)
    assert p.hits and all(float(h["data-precision"]) >= 0.5 for h in p.hits)
    code = steer.main(["search", r"\|0"] + flags)["codes"][0]["code"]
    dom, log = chromium(f"file://{out}#{code}", tmp_path)
    p = DomRows()
    p.feed(dom)
    assert p.body.get("data-view") == "code" and int(p.text["firings"]) == steer.main(["show", code] + flags)["firings"]
    states = json.load(open(os.path.join(os.path.dirname(path), "states.json")))
    for where, view, element in (("", "index", "codes"), ("#fsm", "fsm", "states"), ("#seq=2&pos=5", "seq", "tokcodes"),
                                 ("#search=(", "search", "bad")):  # every view renders, a bad regex says so
        dom, log = chromium(f"file://{out}{where}", tmp_path)
        p = DomRows()
        p.feed(dom)
        assert p.body.get("data-view") == view and "data-errors" not in p.body and p.text.get(element), (where, log[-2000:])
        if view == "fsm":  # the state table: every state's best code, from states.json
            assert all(f"{r['state']}{r['count']}{r['code']}" in p.text["states"] for r in states["per_state"])
    capsys.readouterr()


@pytest.mark.slow
def test_browse_topics_view_in_chromium(lm, tmp_path, capsys):
    """The topics view names each topic's codes per mode and, for a topic with none, why."""
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium package)")
    d, _ = lm
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(d / "cb" / "ckpt.pt", ckpt)
    got = topics.main([f"--ckpt={ckpt}", "--device=cpu", "--samples=1", "--max_new_tokens=4", "--prompts=|Once",
                       "--n_stories=30", "--rule=lift", "--topics=dragon,nothing=qqqzzz", "--max_ce_ratio=10"])
    out = browse.main([f"--ckpt={ckpt}", "--device=cpu", "--n_seqs=3", "--effect_codes=0", f"--out={tmp_path / 'p.html'}"])
    dom, log = chromium(f"file://{out}#topics", tmp_path)
    p = DomRows()
    p.feed(dom)
    assert p.body.get("data-view") == "topics" and "data-errors" not in p.body, log[-2000:]
    text = " ".join(p.text["main"].split())
    assert f"one: no code: {got['nothing']['one']['why_none']}" in " ".join(text.split())
    assert all(c in text for mode in ("one", "all") for c in got["dragon"][mode]["codes"])
    assert f"{got['dragon']['all']['n_codes']} codes ({got['dragon']['all']['n_forced']} slots)" in text
    capsys.readouterr()


@pytest.mark.slow
def test_browse_shows_markup_tokens_as_text_in_chromium(tmp_path, capsys):
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium package)")
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"story {i}: a </script> b <b>bold</b> c & d &amp; e" for i in range(60)))
    td.prepare(str(tmp_path / "data"), input=str(text), encoding="words", words=64)
    train.train(tiny_lm(tmp_path / "m", tmp_path / "data", max_iters=1, eval_interval=1))
    out = browse.main([f"--ckpt={tmp_path / 'm' / 'ckpt.pt'}", "--device=cpu", "--n_seqs=3", "--effect_codes=0"])
    page_of(out)
    dom, log = chromium(f"file://{out}#seq=0", tmp_path)
    p = DomRows()
    p.feed(dom)
    assert p.body.get("data-ready") == "1" and "data-errors" not in p.body, log[-2000:]
    assert set(p.story_tags) == {"span"}  # tokens are spans of text: no <b> and no script came out of them
    assert "</script>" in p.text["story"] and "<b>" in p.text["story"] and " & " in p.text["story"]
    capsys.readouterr()


# -----------------------------------------------------------------------------
# tuned/: the tuned search (tiled.py, triton_kernels.py), held to the plain one


@pytest.mark.parametrize("k,groups,C", [(1, 1, 300), (1, 4, 3000), (3, 4, 300), (8, 2, 3000)])
def test_tuned_and_plain_layers_give_the_same_ids_and_gradients(k, groups, C):
    """use_tuned_search (tiled.py: tiles, block maxima, lean LayerNorm, scatter in rows) against the plain
    layer (codebook.py's search and F.layer_norm), on the CPU plan with C large enough for block maxima."""
    torch.manual_seed(5)
    plain = CodebookLayer(64, C, k=k, groups=groups, max_elems=1 << 14)  # several token and code tiles
    with torch.no_grad():
        plain.ln_weight.uniform_(0.5, 1.5)
        plain.ln_bias.normal_()
    fast = use_tuned_search(copy.deepcopy(plain))
    assert fast.search is tiled.search and plain.search is search and plain.scatter_rows is None
    x, g = torch.randn(2, 150, 64), torch.randn(2, 150, 64)
    runs = []
    for layer in (fast, plain):
        xi = x.clone().requires_grad_(True)
        y, ids = layer(xi)
        (y * g).sum().backward()
        runs.append((ids, y, layer.last_mse, xi.grad, layer.codebook.grad, layer.ln_weight.grad, layer.ln_bias.grad))
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1:], runs[1][1:]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert runs[0][5].abs().sum() > 0  # the LN affine gets a gradient (through the reconstruction term)


@pytest.mark.slow
def test_compiled_searches_give_the_same_ids():
    """compile=True: torch.compile of the plain search's top_codes and of the tuned search's tile top-k."""
    torch.manual_seed(1)
    x, cb = torch.randn(200, 4, 16), torch.randn(4, 2500, 16)
    for k in (1, 4):
        want = brute_topk(x, cb, k)
        assert torch.equal(search(x, cb, k, max_elems=1 << 16, compile=True), want)
        assert torch.equal(tiled.search(x, cb, k, 1 << 16, compile=True), want)


@pytest.mark.parametrize("N,G,C,k,max_elems", [(200, 4, 301, 1, 1 << 11), (200, 4, 2500, 4, 1 << 16),
                                               (16384, 16, 10000, 8, 1 << 26), (5, 1, 3, 3, 1)])
def test_tile_plans_stay_within_their_budget(N, G, C, k, max_elems):
    """plan: tiles of (groups, tokens, codes) of at most max_elems scores (or one row of k codes), whole
    blocks, and block maxima only where a row has at least 64 blocks (top-1: from k1_blocks codes)."""
    for k1_blocks in (256, 2048):
        g, n, c, block = plan(N, G, C, k, max_elems, 16, k1_blocks)
        assert 1 <= g <= G and 1 <= n <= N and k <= c and c % block == 0
        assert g * n * c <= max(max_elems, c)
        wide = c >= k1_blocks and N * G * c >= 1 << 17 if k == 1 else c >= 1024
        assert (block > 1) == (wide and c >= 64 * k)
    # top-1 over 1024 codes: block maxima for a training batch, a plain max for a generation step's 4 tokens
    assert plan(8128, 4, 1024, 1, 1 << 20, 16, 1024)[3] == 16 and plan(4, 4, 1024, 1, 1 << 20, 16, 1024)[3] == 1
    if max_elems == 1 << 11:  # the search test's shapes leave remainders of codes and of tokens
        assert C % c and N % n


def test_device_plans_scale_with_the_machine():
    """A CPU's tile grows with its threads; a GPU's is capped at 1/8 of its free memory (fp32 scores), so
    that the LM shape of benchmarks/search.py is a few large tiles there instead of hundreds of cache-sized ones."""
    from tuned.tiled import device_plan
    one, four = device_plan("cpu", threads=1), device_plan("cpu", threads=4)
    assert four["tile_elems"] == 4 * one["tile_elems"]
    assert device_plan("cuda", free_bytes=1 << 30)["tile_elems"] == (1 << 30) // 8 // 4
    assert device_plan("mps") == device_plan("cuda")

    def tiles(p, k=8, N=16384, G=16, C=10000):
        g, n, c, _ = plan(N, G, C, k, p["tile_elems"], p["block"])
        return -(-G // g) * -(-N // n) * -(-C // c)
    assert tiles(device_plan("cuda", free_bytes=80 << 30)) < 50 < 100 < tiles(device_plan("cpu", threads=2))


@pytest.mark.parametrize("G", [1, 3])
def test_group_layernorm_gradients(G):
    """The hand-written LayerNorm backward (one fused kernel for G = 1, vectorised over groups otherwise)
    against finite differences, with and without a gradient for the input."""
    from tuned.tiled import _GroupLayerNorm
    torch.manual_seed(0)
    x = torch.randn(20, G, 6, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(G, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(_GroupLayerNorm.apply, (x, w, b))
    assert torch.autograd.gradcheck(lambda w, b: _GroupLayerNorm.apply(x.detach(), w, b), (w, b))


def tf32(a):
    """Round to TF32 as a tensor core may: keep 10 mantissa bits, dropping the rest (truncation)."""
    return (a.view(torch.int32) & ~((1 << 13) - 1)).view(torch.float32)


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_fused_error_bound_holds_for_emulated_tensor_cores(precision):
    """triton_search's proof rests on eps_rel: the score error of the candidate pass, emulated here in
    float64 (tf32x3: hi = tf32(a), lo = tf32(a - hi), a.b ~ hi.hi + hi.lo + lo.hi), stays within the
    bound. For tf32 the rounding dominates and the bound is within 16x of the worst error seen; for
    tf32x3 the bound is mostly the fp32 accumulation, which this float64 emulation does not have."""
    from tuned import triton_kernels
    torch.manual_seed(0)
    for d in (16, 32, 128):
        x = torch.randn(4096, d) * torch.rand(4096, 1) * 10
        u = F.normalize(torch.randn(512, d) + 3 * torch.randn(1, d), dim=-1)  # correlated: scores near |x|
        exact = x.double() @ u.double().T
        if precision == "tf32":
            approx = tf32(x).double() @ tf32(u).double().T
        else:
            xh, uh = tf32(x), tf32(u)
            xl, ul = tf32(x - xh), tf32(u - uh)
            approx = xh.double() @ uh.double().T + xh.double() @ ul.double().T + xl.double() @ uh.double().T
        err = ((approx - exact).abs() / x.double().norm(dim=-1, keepdim=True)).max().item()
        bound = triton_kernels.eps_rel(d, precision)
        assert err <= bound, (d, err, bound)
        if precision == "tf32":
            assert bound < 16 * err, (d, err, bound)


def fused_checks():
    """Run by the test below in a process with TRITON_INTERPRET=1: the fused kernels on CPU tensors."""
    from tuned import triton_kernels
    assert triton_kernels.available(torch.device("cpu"))
    for kind in ("cpu", "cuda"):
        tiled.PLANS[kind].update(fused="tf32x3", fused_tile=(16, 32, 4))
    torch.manual_seed(0)
    # (N, G, d, C, k): d not a power of 2; C not a multiple of the tile; fewer blocks than k; C < a tile
    for N, G, d, C, k in [(70, 3, 24, 257, 1), (40, 2, 16, 257, 4), (33, 1, 8, 40, 5), (40, 2, 16, 20, 2)]:
        x = torch.randn(N, G, d)
        cb = torch.randn(G, C, d) * torch.rand(G, C, 1)
        ids, proven = triton_kernels.candidates(x, triton_kernels.unit(cb), k, "tf32x3", 16, (16, 32, 4))
        ids, proven = ids.transpose(0, 1), proven.T  # (N, G, k), (N, G)
        assert proven.float().mean() > 0.9, (N, G, d, C, k)
        assert torch.equal(ids[proven], brute_topk(x, cb, k)[proven]), (N, G, d, C, k)
        assert torch.equal(tiled.search(x, cb, k, kind="cuda"), brute_topk(x, cb, k))
        if k > 1:  # 10 tokens a chunk (k = 1 holds no block maxima: one chunk whatever max_elems)
            chunked = tiled.search(x, cb, k, max_elems=G * 17 * 10, kind="cuda")
            assert torch.equal(chunked, brute_topk(x, cb, k))
    # the candidate pass's exact re-score runs no matmul that TF32 could round (its proof assumes fp32)
    torch.set_float32_matmul_precision("high")
    with MatmulPrecisionSpy() as spy:
        for k in (1, 3):
            triton_kernels.candidates(x, triton_kernels.unit(cb), k, "tf32x3", 16, (16, 32, 4))
    torch.set_float32_matmul_precision("highest")
    assert spy.seen == [], spy.seen
    # the k = 1 kernel's running top 3, merged over 32 tiles of 16 codes, against a sort
    xs, u = torch.randn(40, 1, 16), triton_kernels.unit(torch.randn(1, 500, 16))
    arg, third = torch.empty(2, 1, 40, dtype=torch.int32), torch.empty(1, 40)
    triton_kernels._top1_kernel[(3, 1)](xs, u, arg, third, 40, 500, 16, 16, 16, PREC="ieee", D=16, BM=16, BC=16)
    top = torch.einsum("nd,cd->nc", xs[:, 0], u[0]).topk(3, dim=-1)
    assert torch.equal(arg[:, 0].T.long(), top.indices[:, :2]) and torch.allclose(third[0], top.values[:, 2])
    # the exact kernel: only tokens marked redo (here the even ones), K passes in (score desc, id asc) order;
    # codes 7 and 300 are the same code twice: an exact tie, which goes to the lower id first
    cbx = torch.randn(2, 500, 16)
    cbx[:, 300] = cbx[:, 7]
    xs = torch.randn(40, 2, 16)
    xs[0] = cbx[:, 7]
    u = triton_kernels.unit(cbx)
    for K in (1, 4):
        ids = torch.full((2, 40, K), -7, dtype=torch.long)
        redo = (torch.arange(40) % 2 == 0).expand(2, 40).contiguous()
        triton_kernels._exact_kernel[(3, 2)](xs, u, redo, ids, 40, 500, 16, xs.stride(0), xs.stride(1), K,
                                            D=16, BM=16, BC=16)
        want = brute_topk(xs, cbx, K).transpose(0, 1)  # (G, N, K)
        assert torch.equal(ids[:, 2::2], want[:, 2::2]) and (ids[:, 1::2] == -7).all()
        assert ids[0, 0, 0] == 7 and (K == 1 or ids[0, 0, 1] == 300)
    # near-ties at the k-th place, across blocks: not proven, so searched again exactly
    N, G, d, C = 48, 2, 16, 200

    def at_cos(v, c):  # a code at cosine c from v, of a random norm
        w = torch.randn(d)
        w = F.normalize(w - (w @ v) * v / (v @ v), dim=0)
        return (c * F.normalize(v, dim=0) + math.sqrt(1 - c * c) * w) * (0.5 + torch.rand(()))

    x = torch.randn(N, G, d)
    for k in (1, 2):
        cb = torch.randn(G, C, d)
        for g in range(G):
            for t in range(8):  # token t: codes t, 100 + t, 150 + t (three blocks) 5e-6 apart, from the k-th place
                for code, cos in ((t, 0.99), (100 + t, 0.99 - 5e-6), (150 + t, 0.99 - 1e-5)):
                    cb[g, code] = at_cos(x[t, g], cos)
                if k == 2:
                    cb[g, 50 + t] = at_cos(x[t, g], 0.999)
        ids, proven = triton_kernels.candidates(x, triton_kernels.unit(cb), k, "tf32x3", 16, (16, 32, 4))
        scores = torch.einsum("ngd,gcd->ngc", x, F.normalize(cb, dim=-1)).topk(k + 2, dim=-1).values
        gap = scores[..., k - 1] - scores[..., k + 1]  # k + 1 candidates are scored exactly, so the (k+2)-th
        assert (gap[:8] < triton_kernels.eps_rel(d, "tf32x3") * x[:8].norm(dim=-1)).all()  # near-ties indeed
        assert not proven.T[:8].any() and proven.T[8:].float().mean() > 0.9, k  # sent to the exact search
        assert torch.equal(tiled.search(x, cb, k, kind="cuda"), brute_topk(x, cb, k))
    # inputs whose last dimension is not contiguous, as a view can hand them over
    x, cb = torch.randn(40, 16, 2).transpose(1, 2), torch.randn(2, 100, 16)  # (N, G, d), stride (32, 1, 2)
    for k in (1, 3):
        assert torch.equal(tiled.search(x, cb, k, kind="cuda"), brute_topk(x, cb, k)), k
        assert tiled.search(x[:0], cb, k, kind="cuda").shape == (0, 2, k)  # no tokens: no ids, no error
    # groups wider than the kernels take stay on the torch path
    x, cb = torch.randn(20, 1, triton_kernels.MAX_WIDTH + 32), torch.randn(1, 50, triton_kernels.MAX_WIDTH + 32)
    assert torch.equal(tiled.search(x, cb, 2, kind="cuda"), brute_topk(x, cb, 2))
    with pytest.raises(ValueError, match="the fused kernels take d <= "):
        triton_kernels.search(x, cb, 2)
    # the layer on the fused path: the same ids and output as on the torch path
    torch.manual_seed(1)
    layer = CodebookLayer(dim=32, num_codes=100, k=3, groups=2)
    inp = torch.randn(2, 9, 32)
    y, ids = layer(inp)
    tiled.PLANS["cpu"]["fused"] = None
    y2, ids2 = layer(inp)
    assert torch.equal(ids, ids2) and torch.equal(y, y2)


def interpreter_unusable():
    """Why Triton's interpreter cannot run here, or "". Before Triton 3.7 it turns 1-element arrays into
    ints the way numpy 2.4 forbids (triton-lang/triton#9171), and torch 2.11 brings Triton 3.6."""
    if importlib.util.find_spec("triton") is None:
        return "needs triton (pip install triton): its interpreter runs the CUDA kernels on the CPU"
    version = lambda name: tuple(int(v) for v in re.findall(r"\d+", importlib.metadata.version(name))[:2])  # noqa: E731
    if version("triton") < (3, 7) and version("numpy") >= (2, 4):
        return (f"Triton {importlib.metadata.version('triton')}'s interpreter fails with numpy "
                f"{np.__version__}: needs Triton >= 3.7 or numpy < 2.4")
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(interpreter_unusable()), reason=interpreter_unusable())
def test_fused_search_under_triton_interpreter():
    """The fused kernels, their proof and the exact search of what is not proven, against brute force;
    then benchmarks.search's layer row with --fused."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE, env=env)
             for argv in ([sys.executable, "-c", "import test_all; test_all.fused_checks()"],
                          [sys.executable, "-m", "benchmarks.search", "--quick", "--device=cpu", "--fused=tf32x3",
                           "--fused_tile=128,128,4", "--row=tiny:layer"])]  # a row as the search spawns it
    (_, checks_err), (row_out, row_err) = (p.communicate(timeout=300) for p in procs)  # both at once: 2 cores
    assert procs[0].returncode == 0, checks_err[-3000:]
    assert procs[1].returncode == 0, row_err[-3000:]
    layer = json.loads(row_out.split("ROW ")[-1])
    assert layer["fused"] == "tf32x3" and 0 <= layer["unproven"] < 0.05 and layer["fwdbwd_ms"] > 0


def gpu_usage(kernel, constexprs, warps, arch=90, stages=3):
    """(registers, stack bytes) per thread and shared memory bytes per program of a Triton kernel compiled
    for an NVIDIA GPU on this CPU (arch 90: an H100; 80: an A100; 86/89: RTX 30/40 cards): triton.compile
    needs no GPU, and the cuobjdump that comes with Triton reads the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    pointers = dict(arg_ptr="*i32", j_ptr="*i32", redo_ptr="*i1", ids_ptr="*i64")
    sig = {a: "constexpr" if a in constexprs else pointers.get(a, "*fp32" if a.endswith("_ptr") else "i32")
           for a in kernel.arg_names}
    k = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([path, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return int(regs), int(stack), k.metadata.shared


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
def test_fused_kernels_compiled_for_nvidia_gpus_fit():
    """What a CPU can say about the kernels on a GPU, compiled at the CUDA plan's tile:
    - for an H100 (sm_90), with Triton's default 3 pipeline stages, at the bench's code widths up to
      MAX_WIDTH: the candidate kernels hold everything in registers (no stack), the exact kernel
      (EXACT_TILE) spills at most 64 bytes, and all fit the H100's 227 KB of shared memory;
    - at twice MAX_WIDTH they spill, which is why wider groups stay on the torch search;
    - for an RTX 30/40 card (sm_86, 99 KB a block), at MAX_WIDTH 3 stages do not fit and 2 do, so
      triton_kernels._launch finds a count that runs."""
    from tuned import triton_kernels
    from tuned.tiled import PLANS
    BM, BC, warps = PLANS["cuda"]["fused_tile"]
    B, W = PLANS["cuda"]["block"], triton_kernels.MAX_WIDTH
    bm, bc, w = triton_kernels.EXACT_TILE
    top1 = lambda d: (triton_kernels._top1_kernel, dict(PREC="tf32x3", D=d, BM=BM, BC=BC), warps)  # noqa: E731
    block_max = (triton_kernels._block_max_kernel, dict(PREC="tf32x3", D=W, BM=BM, BC=BC, B=B), warps)
    for d in (32, 64, W):
        _, stack, shared = gpu_usage(*top1(d))
        assert stack == 0 and shared <= 227 * 1024, ("top1", d, stack, shared)
        _, stack, shared = gpu_usage(triton_kernels._exact_kernel, dict(D=d, BM=bm, BC=bc), w)
        assert stack <= 64 and shared <= 227 * 1024, ("exact", d, stack, shared)
    for kernel, c, wp in (block_max, (triton_kernels._rerank_kernel, dict(D=W, BM=BM, B=B), warps)):
        _, stack, shared = gpu_usage(kernel, c, wp)
        assert stack == 0 and shared <= 227 * 1024, (kernel.__name__, stack, shared)
    assert gpu_usage(*top1(2 * W))[1] > 0
    for kernel, c, wp in (top1(W), block_max):
        shared = [gpu_usage(kernel, c, wp, arch=86, stages=s)[2] for s in (3, 2)]
        assert shared[0] > 99 * 1024 >= shared[1], (kernel.__name__, shared)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
def test_fused_launch_takes_fewer_stages_where_shared_memory_is_short():
    """triton_kernels._launch on a kernel that fits only with `fits` stages (Triton raises OutOfResources
    before it launches): it tries 3, 2, 1, keeps the count that ran, and raises when none fits."""
    import triton
    from tuned import triton_kernels

    class Kernel:  # stands for a Triton kernel: kernel[grid](*args, num_stages=s, **meta)
        def __init__(self, fits):
            self.fits, self.tried = fits, []

        def __getitem__(self, grid):
            return self

        def __call__(self, *args, num_stages, **meta):
            self.tried.append(num_stages)
            if num_stages > self.fits:
                raise triton.runtime.OutOfResources(num_stages * 48 * 1024, self.fits * 48 * 1024, "shared memory")

    x = torch.zeros(1)  # the key's device
    for fits, first in ((3, [3]), (2, [3, 2]), (1, [3, 2, 1])):
        kernel = Kernel(fits)
        triton_kernels._launch(kernel, (1, 1), x, D=128, BM=64)
        triton_kernels._launch(kernel, (1, 1), x, D=128, BM=64)  # the count found is kept
        assert kernel.tried == first + [fits], (fits, kernel.tried)
        triton_kernels._launch(kernel, (1, 1), x, D=64, BM=64)  # another tile: tried afresh
        assert kernel.tried[len(first) + 1] == 3
    with pytest.raises(triton.runtime.OutOfResources):
        triton_kernels._launch(Kernel(0), (1, 1), x, D=128, BM=64)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
def test_fused_search_runs_on_gpus_with_tf32_tensor_cores(monkeypatch):
    """triton_kernels.available: CUDA from sm_80 (Ampere) on, groups up to MAX_WIDTH; a Turing GPU (T4,
    sm_75), the CPU without the interpreter and wider groups keep the torch search."""
    from tuned import triton_kernels
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda, W = torch.device("cuda"), triton_kernels.MAX_WIDTH
    for capability, want in (((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert triton_kernels.available(cuda) == want and triton_kernels.available(cuda, W) == want, capability
        assert not triton_kernels.available(cuda, W + 1)
    assert not triton_kernels.available(torch.device("cpu"))


# -----------------------------------------------------------------------------
# pretrained models in the Hugging Face hub's format (GPT-Neo, GPT-2): GPT.from_pretrained against
# transformers (a test-only package), bad files, and a finetune whose checkpoint the scripts load


def hub_dir(path, arch, vocab=61, fmt="safetensors", seed=0, **neox):
    """A tiny random GPTNeoForCausalLM (a global and a local layer, window 5), GPT2LMHeadModel or
    GPTNeoXForCausalLM (Pythia's settings: rotary on a quarter of each head, untied head; neox: more of its
    config), weights perturbed from their init (LayerNorms and biases too), saved as the hub stores it:
    model.safetensors, or a torch.save'd pytorch_model.bin with the attention-mask (and rotary) buffers old
    hub files carry."""
    if os.environ.get("CI") == "true":  # .ci/run installs it: a skip there would hide a broken install
        import transformers as tf
    else:
        tf = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if arch == "gpt_neo":
        config = tf.GPTNeoConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32, num_layers=2,
                                 num_heads=4, attention_types=[[["global", "local"], 1]], window_size=5)
        hf = tf.GPTNeoForCausalLM(config)
    elif arch == "gpt_neox":  # rotary base 500, not the default 10000: a base left unread shows
        config = tf.GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=256,
                                  **{"rotary_pct": 0.25, "rotary_emb_base": 500, **neox})
        hf = tf.GPTNeoXForCausalLM(config)
    else:
        config = tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        hf = tf.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.eval().save_pretrained(str(path), safe_serialization=True)
    if fmt == "bin":
        os.remove(path / "model.safetensors")
        state = dict(hf.state_dict())
        for i in range(2):  # what transformers' old versions saved with the weights
            at = dict(gpt_neo=f"transformer.h.{i}.attn.attention.", gpt2=f"transformer.h.{i}.attn.",
                      gpt_neox=f"gpt_neox.layers.{i}.attention.")[arch]
            state[at + "bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
            state[at + "masked_bias"] = torch.tensor(-1e9)
            if arch == "gpt_neox":  # Pythia's files
                state[at + "rotary_emb.inv_freq"] = torch.ones(2)
        if arch == "gpt_neox":  # transformers 5 calls the head lm_head, the hub's files embed_out
            state["embed_out.weight"] = state.pop("lm_head.weight")
        torch.save(state, path / "pytorch_model.bin")
        if arch == "gpt_neox":  # and transformers 4's config.json, as Pythia's: rotary_pct, rotary_emb_base
            config = json.load(open(path / "config.json"))
            rope = config.pop("rope_parameters")
            json.dump(dict(config, rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"]),
                      open(path / "config.json", "w"))
    return hf


@pytest.mark.slow  # transformers takes seconds to import
@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_pretrained_logits_and_loss_equal_transformers(tmp_path, arch, fmt):
    hf = hub_dir(tmp_path, arch, fmt=fmt)
    model = from_pretrained(str(tmp_path)).eval()
    c = model.config
    assert c.cb_at == "none" and not c.rope and c.gelu == "tanh" and c.block_size == 64
    if arch == "gpt_neo":
        assert (c.scale_attn, c.qkv_bias, c.local_layers, c.local_window) == (False, False, (1,), 5)
    idx = torch.randint(0, 61, (3, 40), generator=torch.Generator().manual_seed(1))  # 40 > the window of 5
    with torch.no_grad():
        theirs = hf(idx, labels=idx)
        logits, loss, _, _ = model(idx[:, :-1], idx[:, 1:])
        full = model(idx)[0]
    assert (logits - theirs.logits[:, :-1]).abs().max().item() < 1e-5
    assert abs(loss.item() - theirs.loss.item()) < 1e-5
    assert (full - theirs.logits).abs().max().item() < 1e-5
    if arch == "gpt_neo":  # the local window does change these logits: a global-only model misses them
        glob = GPT(dataclasses.replace(c, local_layers=())).eval()
        glob.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (glob(idx)[0] - theirs.logits).abs().max().item() > 1e-3


@pytest.mark.slow  # transformers takes seconds to import
def test_from_pretrained_by_hub_id_downloads_then_equals_the_local_directory(fake_hub, tmp_path):
    """The two halves joined: from_pretrained("owner/name") fetches the files through hub.py (the fake
    hub), only the .bin where the repository has no safetensors, and gives the local directory's logits."""
    hub_dir(tmp_path / "src", "gpt_neo", fmt="bin")
    for name in os.listdir(tmp_path / "src"):
        fake_hub.files[f"/owner/tiny-neo/resolve/main/{name}"] = (tmp_path / "src" / name).read_bytes()
    fake_hub.lfs.add("/owner/tiny-neo/resolve/main/pytorch_model.bin")
    idx = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = from_pretrained(str(tmp_path / "src")).eval()(idx)[0]
        got = from_pretrained("owner/tiny-neo").eval()(idx)[0]
    assert torch.equal(got, want)
    assert sorted(os.listdir(tmp_path / "cache" / "models--owner--tiny-neo" / "main")) == ["config.json",
                                                                                            "pytorch_model.bin"]
    with pytest.raises(OSError, match="owner/missing"):  # hub.HubError: one line, for common.fail
        from_pretrained("owner/missing")


@pytest.mark.slow  # transformers takes seconds to import
def test_local_attention_kv_cache_samples_the_full_reruns_tokens(tmp_path):
    """The KV cache keeps every key; the window lives in the mask, so cached generation past the window
    equals rerunning the context, with per-head codebooks in place too."""
    hub_dir(tmp_path, "gpt_neo")
    base = from_pretrained(str(tmp_path))
    cb = GPT(dataclasses.replace(base.config, cb_at="attn", num_codes=16, k=2))
    cb.load_state_dict(base.state_dict(), strict=False)
    for model in (base.eval(), cb.eval()):
        runs = [model.generate(torch.tensor([[1, 2, 3]] * 2), 20, generator=torch.Generator().manual_seed(0),
                               use_cache=use) for use in (True, False)]
        assert torch.equal(*runs)
    assert set(cb.codebooks()) == {"L0.attn", "L1.attn"} and cb.codebooks()["L0.attn"].groups == 4


@pytest.mark.slow  # transformers takes seconds to import
def test_pretrained_block_size_and_tinystories_cap(tmp_path):
    from pretrained import load as pretrained
    d = tmp_path / "TinyStories-tiny"
    hub_dir(d, "gpt_neo")
    assert from_pretrained(str(d)).config.block_size == 64  # below the 512 cap: all positions
    assert from_pretrained(str(d), block_size=20).transformer.wpe.weight.shape == (20, 32)
    with pytest.raises(ValueError, match="has 64 positions"):
        from_pretrained(str(d), block_size=65)
    config = dict(json.load(open(d / "config.json")), max_position_embeddings=2048)
    assert pretrained.map_config(config, str(d))["block_size"] == 512
    assert pretrained.map_config(config, "other")["block_size"] == 2048


@pytest.mark.slow  # transformers takes seconds to import
def test_pretrained_bad_files_are_one_line_errors(tmp_path):
    from pretrained import load as pretrained
    hub_dir(tmp_path / "ok", "gpt2")
    cases = []
    for edit in ("config", "safetensors", "bin", "none"):
        d = tmp_path / edit
        shutil.copytree(tmp_path / "ok", d)
        cases.append(d)
        if edit == "config":
            json.dump(dict(json.load(open(d / "config.json")), model_type="llama"), open(d / "config.json", "w"))
        elif edit == "safetensors":
            data = open(d / "model.safetensors", "rb").read()
            open(d / "model.safetensors", "wb").write(data[:len(data) // 2])
        elif edit == "bin":
            state = pretrained.read_safetensors(str(d / "model.safetensors"))
            os.remove(d / "model.safetensors")
            torch.save(state, d / "pytorch_model.bin")
            data = open(d / "pytorch_model.bin", "rb").read()
            open(d / "pytorch_model.bin", "wb").write(data[:len(data) // 2])
        else:
            os.remove(d / "model.safetensors")
    wants = ["'llama' is not supported; supported: GPT-2 (gpt2), GPT-Neo (gpt_neo, the TinyStories models), GPT-NeoX",
             "truncated or corrupt",
             "unreadable, truncated or corrupt", "neither model.safetensors nor pytorch_model.bin"]
    for d, want in zip(cases, wants):
        with pytest.raises(ValueError) as e:
            from_pretrained(str(d))
        assert want in str(e.value) and "\n" not in str(e.value), (d, str(e.value))
    with pytest.raises(ValueError, match="not a directory holding config.json"):
        from_pretrained(str(tmp_path / "nowhere"))  # a path, not a hub id: hub is never asked


def test_safetensors_reader_by_hand(tmp_path):
    """8 bytes of header length, a JSON header, raw little-endian bytes: F32, F16 and BF16 come back."""
    from pretrained import load as pretrained
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4).half(), "c": torch.randn(3, 1).bfloat16()}
    header, body = {"__metadata__": {"format": "pt"}}, b""
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype={torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[t.dtype],
                            shape=list(t.shape), data_offsets=[len(body), len(body) + len(raw)])
        body += raw
    head = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + body)
    back = pretrained.read_safetensors(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())
    (tmp_path / "x.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + body[:-2])
    with pytest.raises(ValueError, match="truncated or corrupt .*c's bytes"):
        pretrained.read_safetensors(str(tmp_path / "x.safetensors"))


@pytest.mark.slow
def test_bench_finetune_quick_writes_json(tmp_path):
    path = tmp_path / "finetune.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.finetune", "--quick",
                           f"--out={path}"], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert set(rows) == {"finetune_none", "finetune_attn", "scratch_attn", "pythia70m_none", "pythia70m_attn"}
    neox = rows["pythia70m_attn"]["config"]  # pythia-70m's shape, through from_pretrained's map_config
    assert (neox["n_layer"], neox["rope_pct"], neox["parallel"], neox["tie_head"], neox["learned_pos"]) == \
        (6, 0.25, True, False, False)
    assert result["projection"]["pythia410m_attn"]["h200_hours"] > 0
    assert all(r["s_per_step"] > 0 and r["step_peak_mb"] is not None for r in rows.values())
    assert rows["finetune_attn"]["params_m"] > rows["finetune_none"]["params_m"]  # the codes
    p = result["projection"]["finetune_attn"]
    assert p["h200_hours_100k"] == pytest.approx(10 * p["h200_hours_10k"]) and "Not measured on a GPU" in proc.stdout


def test_init_from_checks_the_datas_tokens(capsys):
    """A hub GPT-2 / GPT-Neo reads gpt2 tokens: data of another encoding stop, as does another vocab."""
    meta = dict(encoding=dict(kind="bytes"), vocab_size=50257)
    data = train_data.Data(None, None, None, 50257, "", dict(kind="lm", data=dict(data_dir="D", meta=meta)))
    base = dict(pretrained="gpt2", model_args=dict(vocab_size=50257))
    for vocab, kind in ((50257, "bytes"), (50000, "gpt2")):
        meta.update(encoding=dict(kind=kind), vocab_size=vocab)
        data.vocab_size = vocab
        with pytest.raises(SystemExit):
            checkpoints.check_encoding(base, data, "gpt2")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "reads gpt2 tokens, vocab 50257" in err and f"vocab {vocab}" in err
    meta.update(encoding=dict(kind="gpt2"), vocab_size=50257)
    data.vocab_size = 50257
    checkpoints.check_encoding(base, data, "gpt2")  # passes
    # a Pythia reads its own tokenizer.json: 50277 tokens in 50304 rows, that file and no other
    pythia = dict(pretrained="EleutherAI/pythia-70m", model_args=dict(vocab_size=50304), tokenizer_sha256="ab")
    for vocab, sha, ok in ((50277, "ab", True), (50304, "ab", True), (50305, "ab", False), (50277, "cd", False)):
        meta.update(encoding=dict(kind="hf", sha256=sha), vocab_size=vocab)
        data.vocab_size = vocab
        if ok:
            checkpoints.check_encoding(pythia, data, "EleutherAI/pythia-70m")
            continue
        with pytest.raises(SystemExit):
            checkpoints.check_encoding(pythia, data, "EleutherAI/pythia-70m")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "tokenizer.json's tokens, vocab 50304" in err and "--encoding=HUB_ID" in err
    meta.update(encoding=dict(kind="gpt2"), vocab_size=50257)  # gpt2 tokens are not Pythia's
    data.vocab_size = 50257
    with pytest.raises(SystemExit):
        checkpoints.check_encoding(pythia, data, "EleutherAI/pythia-70m")
    assert "vocab 50304" in capsys.readouterr().err


def test_linear_lr_schedule():
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=10, max_iters=110, lr_decay="linear")
    assert [train.lr_at(i, cfg) for i in (10, 60, 110)] == [1.0, 0.5, 0.0]
    assert train.lr_at(35, cfg) == pytest.approx(0.75)
    cosine = dataclasses.replace(cfg, lr_decay="cosine")
    assert train.lr_at(35, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.slow
def test_finetune_a_hub_model_and_its_checkpoint_loads_in_the_scripts(tmp_path, capsys):
    """A tiny hub-format GPT-Neo of the data's vocabulary: finetuned with per-head codebooks (k-means from
    its own activations), then steer.py usage / search / show, topics.py and --resume read the checkpoint."""
    td.prepare(str(tmp_path / "data"), synthetic=True, num_stories=300, seed=0, val_every=10)
    vocab = json.load(open(tmp_path / "data" / "meta.json"))["vocab_size"]
    hub_dir(tmp_path / "neo", "gpt_neo", vocab=vocab)
    none = train.train(tiny_lm(tmp_path / "none", tmp_path / "data", init_from=str(tmp_path / "neo"), cb_at="none",
                               max_iters=0))  # the pretrained model's own loss
    m = train.train(tiny_lm(tmp_path / "cb", tmp_path / "data", init_from=str(tmp_path / "neo"), max_iters=4,
                            eval_interval=4))
    assert set(m["alive"]) == {"L0.attn", "L1.attn", "all"} and m["val_loss"] < none["val_loss"] + 1.0
    path = str(tmp_path / "cb" / "ckpt.pt")
    ckpt, model = readout.load_codebook_model(path)
    c = model.config
    assert (c.local_layers, c.local_window, c.scale_attn, c.qkv_bias, c.rope, c.block_size) == \
        ((1,), 5, False, False, False, 64)
    assert ckpt["kind"] == "lm" and ckpt["config"]["init_from"] == str(tmp_path / "neo")
    flags = [f"--ckpt={path}", "--n_seqs=4", "--batch_size=4", "--device=cpu"]  # windows of its val.bin
    usage = steer.main(["usage"] + flags)
    assert set(usage) == {"L0.attn", "L1.attn"} and all(0 < u["alive"] <= 1 for u in usage.values())
    found = steer.main(["search", "e", "--top=3"] + flags)  # the letter e, in the stories' text
    assert found["matches"] > 0 and found["codes"] and all(0 < r["precision"] <= 1 for r in found["codes"])
    shown = steer.main(["show", found["codes"][0]["code"], "--top=2"] + flags)
    assert shown["firings"] == found["codes"][0]["fired"] and len(shown["top"]) == min(2, shown["firings"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # states and patch are TokFSM's
        steer.main(["states", f"--ckpt={path}", "--device=cpu"])
    assert capsys.readouterr().err == "error: states needs an FSM checkpoint; this one has kind='lm'\n"
    out = topics.main([f"--ckpt={path}", "--device=cpu", "--samples=1", "--max_new_tokens=8", "--prompts=|Once",
                       "--n_stories=20", "--max_codes=2", "--max_ce_ratio=10", "--controls=False"])
    assert all(out[t][mode]["n_codes"] <= 2 for t in td.TOPIC_STORY for mode in ("one", "all"))
    cfg, given = common.parse_args([f"--out_dir={tmp_path / 'cb'}", "--resume=True", "--max_iters=6"],
                                   train.TrainConfig, train.PRESETS)
    assert train.train(cfg, given)["iters"] == 6
    hub_dir(tmp_path / "neo61", "gpt_neo")  # a model of another vocabulary than the data's
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.train(tiny_lm(tmp_path / "x", tmp_path / "data", init_from=str(tmp_path / "neo61")))
    assert "vocab 61" in capsys.readouterr().err


@pytest.mark.slow  # transformers takes seconds to import
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_neox_logits_loss_and_kv_cache_equal_transformers(tmp_path, parallel, fmt):
    """A tiny Pythia-shaped GPT-NeoX (rotary on 4 of a head's 16 dims, base 500, an untied head, vocabulary
    64 padded beyond the 61 ids it reads), parallel and sequential residual: transformers' logits and loss,
    in one forward and token by token through the KV cache. Each setting changes the logits."""
    hf = hub_dir(tmp_path, "gpt_neox", vocab=64, fmt=fmt, use_parallel_residual=parallel)
    model = from_pretrained(str(tmp_path)).eval()
    c = model.config
    assert (c.rope, c.rope_pct, c.rope_base, c.learned_pos, c.parallel, c.tie_head, c.gelu, c.block_size,
            c.vocab_size, c.cb_at) == (True, 0.25, 500.0, False, parallel, False, "exact", 64, 64, "none")
    assert "transformer.wpe.weight" not in model.state_dict()
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    idx = torch.randint(0, 61, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(idx, labels=idx)
        logits, loss, _, _ = model(idx[:, :-1], idx[:, 1:])
        full = model(idx)[0]
        cache = KVCache()
        cached = torch.cat([model(idx[:, :25], kv_cache=cache)[0]] +
                           [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(25, 40)], 1)
    assert full.shape == (3, 40, 64)  # the padded ids get logits too
    assert (logits - theirs.logits[:, :-1]).abs().max().item() < 1e-5
    assert abs(loss.item() - theirs.loss.item()) < 1e-5
    assert (full - theirs.logits).abs().max().item() < 1e-5
    assert (cached - theirs.logits).abs().max().item() < 1e-5
    for change in (dict(rope_pct=1.0), dict(rope_base=10000.0), dict(parallel=not parallel)):
        other = GPT(dataclasses.replace(c, **change)).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (other(idx)[0] - theirs.logits).abs().max().item() > 1e-3, change


@pytest.mark.slow  # transformers takes seconds to import
def test_neox_from_shards_equals_one_file(tmp_path):
    """pythia-6.9b and -12b come in shards that an index.json lists, as safetensors or .bin: the same model."""
    from pretrained import load as pretrained
    hub_dir(tmp_path / "one", "gpt_neox")
    state = pretrained.read_safetensors(str(tmp_path / "one" / "model.safetensors"))
    names = sorted(state)
    idx = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = from_pretrained(str(tmp_path / "one")).eval()(idx)[0]
    for index, shard in (("model.safetensors.index.json", "model-0000{}-of-00002.safetensors"),
                         ("pytorch_model.bin.index.json", "pytorch_model-0000{}-of-00002.bin")):
        d = tmp_path / index.split(".")[1]
        d.mkdir()
        shutil.copy(tmp_path / "one" / "config.json", d)
        weight_map = {}
        for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
            tensors = {n: state[n] for n in part}
            if shard.endswith(".bin"):
                torch.save(tensors, d / shard.format(i + 1))
            else:
                from safetensors.torch import save_file
                save_file(tensors, str(d / shard.format(i + 1)))
            weight_map.update({n: shard.format(i + 1) for n in part})
        json.dump(dict(metadata={}, weight_map=weight_map), open(d / index, "w"))
        with torch.no_grad():
            assert torch.equal(from_pretrained(str(d)).eval()(idx)[0], want)
        os.remove(d / shard.format(2))
        with pytest.raises(ValueError, match="lists 2 shards, 1 not in"):
            from_pretrained(str(d))


@pytest.mark.slow  # transformers takes seconds to import
def test_neox_codebooks_sit_where_ours_do_and_the_kv_cache_samples_the_rerun(tmp_path):
    """Per-head codebooks on attention's outputs before c_proj, one on the MLP's output before the residual
    add; in the parallel residual the MLP reads ln_2 of the block's input. Cached generation equals the
    rerun, with and without codebooks."""
    hub_dir(tmp_path, "gpt_neox")
    base = from_pretrained(str(tmp_path))
    cb = GPT(dataclasses.replace(base.config, cb_at="attn+mlp", num_codes=16, k=2))
    cb.load_state_dict(base.state_dict(), strict=False)
    idx = torch.randint(0, 61, (4, 32), generator=torch.Generator().manual_seed(3))
    cb.init_codebooks(idx, iters=2)
    assert list(cb.codebooks()) == ["L0.attn", "L0.mlp", "L1.attn", "L1.mlp"]
    assert cb.codebooks()["L0.attn"].groups == 4 and cb.codebooks()["L1.mlp"].groups == 1
    acts = {}
    with torch.no_grad():
        _, _, codes, _ = cb.eval()(idx, activations=acts)
        block, x = cb.transformer.h[0], cb.transformer.wte(idx)  # no learned positions
        mlp_out = block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x))))
    assert codes["L0.attn"].shape == (4, 32, 4, 2) and codes["L1.mlp"].shape == (4, 32, 1, 2)
    assert (acts["L0.mlp.in"] - mlp_out).abs().max().item() < 1e-5
    for model in (base.eval(), cb):
        runs = [model.generate(torch.tensor([[1, 2, 3]] * 2), 30, generator=torch.Generator().manual_seed(0),
                               use_cache=use) for use in (True, False)]
        assert torch.equal(*runs)


@pytest.mark.slow
def test_finetune_a_neox_and_its_checkpoint_loads_in_the_scripts(tmp_path, capsys):
    """A tiny hub-format GPT-NeoX (parallel residual, partial rotary, untied head) of the data's vocabulary,
    finetuned with codebooks at attention and MLP: steer.py usage / search / show, topics.py and browse.py
    read its checkpoint as they read our own."""
    td.prepare(str(tmp_path / "data"), synthetic=True, num_stories=300, seed=0, val_every=10)
    vocab = json.load(open(tmp_path / "data" / "meta.json"))["vocab_size"]
    hub_dir(tmp_path / "neox", "gpt_neox", vocab=vocab)
    m = train.train(tiny_lm(tmp_path / "cb", tmp_path / "data", init_from=str(tmp_path / "neox"), cb_at="attn+mlp",
                            max_iters=4, eval_interval=4))
    assert set(m["alive"]) == {"L0.attn", "L0.mlp", "L1.attn", "L1.mlp", "all"}
    path = str(tmp_path / "cb" / "ckpt.pt")
    ckpt, model = readout.load_codebook_model(path)
    c = model.config
    assert (c.parallel, c.learned_pos, c.tie_head, c.rope_pct, c.rope_base, c.block_size) == \
        (True, False, False, 0.25, 500.0, 64)
    flags = [f"--ckpt={path}", "--n_seqs=4", "--batch_size=4", "--device=cpu"]
    usage = steer.main(["usage"] + flags)
    assert set(usage) == {"L0.attn", "L0.mlp", "L1.attn", "L1.mlp"}
    found = steer.main(["search", "e", "--top=3"] + flags)
    assert found["matches"] > 0 and found["codes"]
    shown = steer.main(["show", found["codes"][0]["code"], "--top=2"] + flags)
    assert shown["firings"] == found["codes"][0]["fired"]
    out = topics.main([f"--ckpt={path}", "--device=cpu", "--samples=1", "--max_new_tokens=8", "--prompts=|Once",
                       "--n_stories=20", "--max_codes=2", "--max_ce_ratio=10", "--controls=False"])
    assert all(out[t][mode]["n_codes"] <= 2 for t in td.TOPIC_STORY for mode in ("one", "all"))
    data = page_of(browse.main([f"--ckpt={path}", "--device=cpu", "--n_seqs=3", f"--out={tmp_path / 'neox.html'}"]))
    assert data["meta"]["kind"] == "lm" and len(data["seqs"]) == 3
    capsys.readouterr()


def test_pythia_config_maps_and_unsupported_neox_settings_are_one_line():
    """pythia-70m's config.json (transformers 4's names): 70,426,624 parameters, as EleutherAI count them
    (untied head, no position embedding); settings this GPT does not compute stop with one line."""
    from pretrained import load as pretrained
    c = dict(model_type="gpt_neox", hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
             intermediate_size=2048, max_position_embeddings=2048, vocab_size=50304, hidden_act="gelu",
             rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, tie_word_embeddings=False,
             layer_norm_eps=1e-5, rope_scaling=None)
    args = pretrained.map_config(c, "EleutherAI/pythia-70m")
    assert (args["block_size"], args["rope_pct"], args["parallel"], args["tie_head"], args["learned_pos"]) == \
        (2048, 0.25, True, False, False)
    with torch.device("meta"):
        assert sum(p.numel() for p in GPT(GPTConfig(**args)).parameters()) == 70_426_624
    bad = dict(c, attention_bias=False, hidden_act="relu", rope_scaling=dict(rope_type="linear", factor=2.0))
    with pytest.raises(ValueError) as e:
        pretrained.map_config(bad, "x")
    assert all(w in str(e.value) for w in ("attention_bias=False", "hidden_act=relu", "rope_type=linear"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="rotary_pct=0.05 .3 of a head's 64 dims; needs an even number"):
        pretrained.map_config(dict(c, rotary_pct=0.05), "x")


# -----------------------------------------------------------------------------
# hub.py: downloads from the Hugging Face hub (a local http.server stands in for it); gpt2 tokens offline


def git_sha1(data):
    """The hub's ETag of a file stored in git: its git blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub's resolve URLs for `files` ({"/{repo}/resolve/{rev}/{file}": bytes}): an LFS file (in `lfs`)
    as the hub serves it, a redirect carrying X-Linked-Etag (sha256) and X-Linked-Size to /cdn/..., whose
    own ETag is no hash; any other file with its git-sha1 ETag. Range is honoured; a missing file of a
    known repository is a 404 EntryNotFound, an unknown repository a 401 RepoNotFound (as on the hub).
    `cut`: path -> bytes after which the next answer stops (a dropped connection, once); `bad`: paths
    served with one byte flipped. Each request is logged as (path, Range header)."""

    def do_GET(self):
        hub_ = type(self)
        hub_.log.append((self.path, self.headers.get("Range")))
        path = self.path.removeprefix("/cdn")
        if path not in hub_.files:
            known = any(p.startswith(path.split("/resolve/")[0] + "/resolve/") for p in hub_.files)
            self.send_response(404 if known else 401)
            self.send_header("X-Error-Code", "EntryNotFound" if known else "RepoNotFound")
            self.end_headers()
            return
        data = hub_.files[path]
        if path in hub_.lfs and not self.path.startswith("/cdn/"):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/cdn{path}")
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.end_headers()
            return
        etag = "0123abcd-cdn" if path in hub_.lfs else git_sha1(data)
        if path in hub_.bad:
            data = data[:-1] + bytes([data[-1] ^ 1])
        start = int(re.match(r"bytes=(\d+)-", self.headers["Range"])[1]) if self.headers.get("Range") else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{etag}"')
        self.end_headers()
        self.wfile.write(data[start:start + hub_.cut.pop(path, len(data))])

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A FakeHub on 127.0.0.1 as HF_ENDPOINT, the cache in tmp_path/cache."""
    handler = type("Hub", (FakeHub,), dict(files={}, lfs=set(), cut={}, bad=set(), log=[]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.01), daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield handler
    server.shutdown()
    server.server_close()


WEIGHT_BYTES = bytes(range(256)) * 64  # 16 KiB


def add_model(fake, repo="owner/tiny", rev="main", weights=("model.safetensors",)):
    """config.json (in git) and weights (LFS) of a repository on the fake hub."""
    fake.files[f"/{repo}/resolve/{rev}/config.json"] = b'{"model_type": "gpt_neo"}\n'
    for w in weights:
        fake.files[f"/{repo}/resolve/{rev}/{w}"] = WEIGHT_BYTES + w.encode()
        fake.lfs.add(f"/{repo}/resolve/{rev}/{w}")


def cached_files(tmp_path):
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_hub_download_full_then_cached(fake_hub, tmp_path):
    add_model(fake_hub)
    path = hub.model_dir("owner/tiny")
    assert path == str(tmp_path / "cache" / "models--owner--tiny" / "main")  # the documented layout
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == WEIGHT_BYTES + b"model.safetensors"
    assert [p for p, _ in fake_hub.log] == ["/owner/tiny/resolve/main/config.json",
                                            "/owner/tiny/resolve/main/model.safetensors",
                                            "/cdn/owner/tiny/resolve/main/model.safetensors",
                                            "/owner/tiny/resolve/main/tokenizer.json"]  # a 404: none
    assert cached_files(tmp_path) == ["models--owner--tiny/main/config.json",
                                      "models--owner--tiny/main/model.safetensors"]  # nothing .incomplete
    n = len(fake_hub.log)
    assert hub.model_dir("owner/tiny") == path and len(fake_hub.log) == n  # cached: no request at all
    add_model(fake_hub, rev="v1")
    assert hub.model_dir("owner/tiny@v1").endswith(os.path.join("models--owner--tiny", "v1"))
    assert hub.model_dir("owner/tiny", revision="v1") == hub.model_dir("owner/tiny@v1")
    assert hub.parse_name("gpt2-xl") == ("openai-community/gpt2-xl", "main")


def test_hub_download_resumes_a_dropped_connection(fake_hub, tmp_path):
    add_model(fake_hub)
    url = "/owner/tiny/resolve/main/model.safetensors"
    fake_hub.cut[url] = 5000  # the first answer stops after 5000 bytes; the retry asks for the rest
    path = hub.model_dir("owner/tiny")
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == fake_hub.files[url]
    assert [r for p, r in fake_hub.log if p == "/cdn" + url] == [None, "bytes=5000-"]
    # with one attempt per call the partial file stays .incomplete, and the next call resumes it
    fake_hub.cut[url] = 3000
    target = str(tmp_path / "one" / "w.bin")
    with pytest.raises(hub.HubError) as e:
        hub.download(fake_hub_url(url), target, attempts=1)
    assert "\n" not in str(e.value) and "run again to resume" in str(e.value)
    assert not os.path.exists(target) and os.path.getsize(target + ".incomplete") == 3000
    hub.download(fake_hub_url(url), target, attempts=1)
    assert fake_hub.log[-1] == ("/cdn" + url, "bytes=3000-")
    assert open(target, "rb").read() == fake_hub.files[url] and not os.path.exists(target + ".incomplete")


def fake_hub_url(path):
    return os.environ["HF_ENDPOINT"] + path


def test_hub_falls_back_to_the_bin_on_a_404(fake_hub, tmp_path):
    add_model(fake_hub, weights=("pytorch_model.bin",))  # as the TinyStories repositories have it on main
    path = hub.model_dir("owner/tiny")
    assert sorted(os.listdir(path)) == ["config.json", "pytorch_model.bin"]
    assert ("/owner/tiny/resolve/main/model.safetensors", None) in fake_hub.log
    n = len(fake_hub.log)
    assert hub.model_dir("owner/tiny") == path and len(fake_hub.log) == n
    fake_hub.files.pop("/owner/tiny/resolve/main/config.json")  # a repository with neither weights file
    fake_hub.files["/owner/other/resolve/main/config.json"] = b"{}"
    with pytest.raises(hub.HubError, match="neither model.safetensors nor pytorch_model.bin"):
        hub.model_dir("owner/other")


def test_hub_fetches_the_shards_an_index_lists(fake_hub, tmp_path):
    """No single weights file: its .index.json, then each shard it lists once (as pythia-6.9b's); cached,
    no request; a shard missing from the cache is fetched again; a bad index stops with one line."""
    add_model(fake_hub, weights=())
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = dict(weight_map={"a": names[0], "b": names[1], "c": names[0]})
    fake_hub.files["/owner/tiny/resolve/main/model.safetensors.index.json"] = json.dumps(index).encode()
    for n in names:
        fake_hub.files[f"/owner/tiny/resolve/main/{n}"] = WEIGHT_BYTES + n.encode()
        fake_hub.lfs.add(f"/owner/tiny/resolve/main/{n}")
    path = hub.model_dir("owner/tiny")
    assert sorted(os.listdir(path)) == sorted(["config.json", "model.safetensors.index.json", *names])
    assert [p for p, _ in fake_hub.log].count(f"/owner/tiny/resolve/main/{names[0]}") == 1
    n = len(fake_hub.log)
    assert hub.model_dir("owner/tiny") == path and len(fake_hub.log) == n and hub.model_dir(path) == path
    os.remove(os.path.join(path, names[1]))  # an interrupted download: the missing shard again
    assert hub.model_dir("owner/tiny") == path and os.path.exists(os.path.join(path, names[1]))
    fake_hub.files["/owner/bad/resolve/main/config.json"] = b"{}"
    fake_hub.files["/owner/bad/resolve/main/model.safetensors.index.json"] = b'{"weight_map": {"a": "../x"}}'
    with pytest.raises(hub.HubError, match="not a file name") as e:
        hub.model_dir("owner/bad")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])  # sha256 (LFS), git sha1 (in git)
def test_hub_corrupt_download_is_caught_and_removed(fake_hub, tmp_path, name):
    add_model(fake_hub)
    fake_hub.bad.add(f"/owner/tiny/resolve/main/{name}")
    with pytest.raises(hub.HubError) as e:
        hub.model_dir("owner/tiny")
    assert "\n" not in str(e.value) and "corrupt" in str(e.value) and name in str(e.value)
    assert f"models--owner--tiny/main/{name}" not in cached_files(tmp_path)
    assert not [f for f in cached_files(tmp_path) if f.endswith(".incomplete")]  # nothing to resume from
    fake_hub.bad.clear()
    path = hub.model_dir("owner/tiny")  # the next run fetches it whole
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == WEIGHT_BYTES + b"model.safetensors"


def test_hub_bad_names_unknown_repos_and_no_network_are_one_line(fake_hub, tmp_path, monkeypatch):
    add_model(fake_hub)
    for name, want in (("nobody/nothing", "no such repository"), ("owner/tiny@v9", "config.json: no such file"),
                       ("not a name", "expected a hub id owner/name")):
        with pytest.raises(hub.HubError) as e:
            hub.model_dir(name)
        assert "\n" not in str(e.value) and want in str(e.value), str(e.value)
    assert cached_files(tmp_path) == []
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text("{}")
    with pytest.raises(hub.HubError, match="needs config.json and one of"):
        hub.model_dir(str(local))
    (local / "pytorch_model.bin").write_bytes(b"")
    assert hub.model_dir(str(local)) == str(local)  # a local directory: no network needed
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(hub.HubUnreachable) as e:
        hub.model_dir("owner/tiny")
    assert "\n" not in str(e.value) and "cannot reach" in str(e.value) and "local directory" in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub's switch: the cache only, not even an attempt
    n = len(fake_hub.log)
    with pytest.raises(hub.HubUnreachable, match="HF_HUB_OFFLINE is set.*local directory"):
        hub.model_dir("owner/tiny")
    assert len(fake_hub.log) == n


def test_hub_cache_dir_follows_the_hub_conventions(monkeypatch):
    for var in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert hub.cache_dir() == os.path.expanduser("~/.cache/huggingface/hub")
    monkeypatch.setenv("HF_HOME", "/x/hf")
    assert hub.cache_dir() == os.path.join("/x/hf", "hub")
    monkeypatch.setenv("HF_HUB_CACHE", "/y/cache")
    assert hub.cache_dir() == "/y/cache"
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert hub.endpoint() == "https://huggingface.co"


def test_tinystories_sources_download_through_the_hub(fake_hub, tmp_path, monkeypatch):
    """--source=paper fetches the original TinyStories files of the hub dataset, --source=v2 the GPT-4 ones."""
    for source, (train_file, valid_file) in td.SOURCES.items():
        for f, docs in ((train_file, DOCS[:3]), (valid_file, DOCS[3:])):
            path = f"/datasets/{td.DATASET}/resolve/{td.DATASET_REVISION}/{f}"
            fake_hub.files[path] = ("\n<|endoftext|>\n".join(docs) + "\n").encode()
            fake_hub.lfs.add(path)
        meta = td.prepare(str(tmp_path / source), source=source, encoding="bytes")
        train_data, val_data, _ = td.load_tokens(str(tmp_path / source))
        enc = td.make_encoding(meta["encoding"])
        assert enc.decode(train_data.tolist()) == "".join("<|endoftext|>" + d for d in DOCS[:3])
        assert enc.decode(val_data.tolist()) == "".join("<|endoftext|>" + d for d in DOCS[3:])
        assert train_file in meta["source"] and td.DATASET_REVISION in meta["source"]
        assert f"datasets--roneneldan--TinyStories/{td.DATASET_REVISION}/{train_file}" in cached_files(tmp_path)
    assert td.SOURCES["paper"] == ("TinyStories-train.txt", "TinyStories-valid.txt")
    with pytest.raises(ValueError, match="valid: v2, paper"):
        td.prepare(str(tmp_path / "x"), source="v3")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    with pytest.raises(hub.HubUnreachable) as e:
        td.prepare(str(tmp_path / "x"), source="paper")
    assert "\n" not in str(e.value) and "--input=FILE" in str(e.value)


def gpt2_ranks():
    """The local gpt2.tiktoken that .ci/run fetches (openai-whisper's source archive on PyPI), else skip."""
    path = os.environ.get(td.GPT2_TIKTOKEN, "")
    if not os.path.isfile(path):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{td.GPT2_TIKTOKEN} is not a file in CI: .ci/run should have fetched gpt2.tiktoken")
        pytest.skip(f"{td.GPT2_TIKTOKEN} names no file (.ci/run fetches gpt2.tiktoken from openai-whisper's sdist)")
    return path


def test_r50k_hash_is_tiktokens_own():
    import inspect
    import tiktoken_ext.openai_public
    assert f'expected_hash="{td.R50K_SHA256}"' in inspect.getsource(tiktoken_ext.openai_public.r50k_base)


def test_gpt2_tokens_from_a_local_ranks_file(tmp_path, monkeypatch):
    """tiktoken's own gpt2 vectors (tests/test_encoding.py), from the file, with no download."""
    path = gpt2_ranks()
    monkeypatch.setattr(td.tiktoken, "get_encoding", None)  # a download would fail loudly
    enc = td.make_encoding({"kind": "gpt2"}, path)
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("hello world") == [31373, 995] and enc.decode([31373, 995]) == "hello world"
    assert enc.encode("hello <|endoftext|>", allowed_special="all") == [31373, 220, 50256]
    zeros = {1: [15], 2: [405], 3: [830], 4: [2388], 5: [20483], 6: [10535], 7: [24598], 8: [8269],
             9: [10535, 830], 16: [25645], 17: [8269, 10535, 830]}
    assert {n: enc.encode("0" * n) for n in zeros} == zeros
    meta = td.prepare(str(tmp_path / "d"), input=str(write_docs(tmp_path, "\n\n")), encoding=path, val_every=2)
    assert meta["encoding"] == {"kind": "gpt2"} and meta["vocab_size"] == 50257 and meta["eot"] == 50256
    monkeypatch.setenv(td.GPT2_TIKTOKEN, path)  # how train.py, readout.py and topics.py find it later
    train_data, _, meta = td.load_tokens(str(tmp_path / "d"))
    text = td.make_encoding(meta["encoding"]).decode(train_data.tolist())
    assert text == "".join("<|endoftext|>" + d for d in DOCS[0::2])


def test_a_wrong_ranks_file_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    monkeypatch.setenv(td.GPT2_TIKTOKEN, str(bad))
    with pytest.raises(ValueError) as e:
        td.make_encoding({"kind": "gpt2"})
    assert "\n" not in str(e.value) and "r50k_base" in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(OSError) as e:
        td.prepare(str(tmp_path / "d"), input=str(write_docs(tmp_path, "\n\n")),
                   encoding=str(tmp_path / "missing.tiktoken"))
    assert "\n" not in str(e.value) and "missing.tiktoken" in str(e.value)


# -----------------------------------------------------------------------------
# pretrained/tokenizer.py: a model's tokenizer.json as a tiktoken encoding, held to the tokenizers package
# (a test-only package); tinystories_data.py --encoding=HUB_ID_OR_DIR; hub.py fetching it with the model

TOK_STRINGS = ["Once upon a time, there was a cat.", "<|endoftext|>The cat sat.<|endoftext|>",
               "<|padding|><|padding|>x", "a  b   c    d" + " " * 30 + "e", "tabs\t\tand\nnew\n\n\nlines \r\n end",
               "   leading and trailing   ", "\u6f22\u5b57\u304b\u306a\u3002\u732b",
               "emoji \U0001f600\U0001f44d\U0001f3fd \U0001f469\u200d\U0001f4bb",
               "caf\u00e9 cafe\u0301 a\u0316\u0301 n\u0303o", "it's they're we'll I'd", "\u00a0\u2003\u3000|x \u200b",
               "<|endoftext", "endoftext|>", "", " ", "\n", "x" * 300]


def train_bpe_tokenizer(path, vocab_size=400):
    """A small byte-level BPE tokenizer.json trained by the tokenizers package, made as Pythia's is: NFC,
    ByteLevel pre-tokenizer and decoder, <|endoftext|> 0 and <|padding|> 1 special, runs of spaces added
    as tokens that are not special. -> the tokenizers.Tokenizer."""
    tk = pytest.importorskip("tokenizers")
    rng = random.Random(0)
    words = ("the cat sat on a mat dog ran happy it's don't caf\u00e9 na\u00efve \u6f22\u5b57 \u304b\u306a "
             "\U0001f600 \U0001f44d\U0001f3fd 123 4567 x=1; (y)").split()
    words += ["".join(rng.choice(["ka", "to", "ri", "mu", "sen", "lo", "qua", "st", "ng"]) for _ in range(3))
              for _ in range(200)]  # made-up words: enough pairs for a few hundred merges
    text = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice(["\n", "\t", "  ", "   \n\n"])
            for _ in range(300)]
    tok = tk.Tokenizer(tk.models.BPE())
    tok.normalizer = tk.normalizers.NFC()
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.train_from_iterator(text, tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"], show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([" " * n for n in (8, 4, 3, 2)])
    tok.save(str(path))
    return tok


def test_tokenizer_json_encodes_and_decodes_every_string_as_tokenizers_does(tmp_path):
    import tokenizers
    import unicodedata
    from pretrained import tokenizer
    theirs = train_bpe_tokenizer(tmp_path / "tokenizer.json")
    enc = tokenizer.load(str(tmp_path / "tokenizer.json"))
    assert len(json.load(open(tmp_path / "tokenizer.json"))["model"]["merges"]) > 100  # a real BPE, not bytes
    plain = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    plain.encode_special_tokens = True  # tokenizers' "ordinary": special tokens are text, added ones still found
    for s in TOK_STRINGS:
        ids = theirs.encode(s, add_special_tokens=False).ids
        assert enc.encode(s, allowed_special="all") == ids, s
        assert enc.encode_ordinary(s) == plain.encode(s, add_special_tokens=False).ids, s
        assert enc.decode(ids) == theirs.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", s)
    assert enc.encode_ordinary_batch(TOK_STRINGS) == [enc.encode_ordinary(s) for s in TOK_STRINGS]
    assert enc.encode("a" + " " * 10 + "b", disallowed_special=()) == theirs.encode("a" + " " * 10 + "b").ids
    assert enc.eot_token == 0 and enc.special_tokens_set == {"<|endoftext|>", "<|padding|>"}
    with pytest.raises(ValueError, match="disallowed special token"):
        enc.encode("a<|padding|>")  # as tiktoken's encode: special text is refused unless allowed
    rng = random.Random(1)  # any ids, partial UTF-8 characters and added tokens among them, decode alike
    for _ in range(200):
        ids = [rng.randrange(enc.n_vocab) for _ in range(rng.randint(1, 12))]
        assert enc.decode(ids) == theirs.decode(ids, skip_special_tokens=False), ids
    assert enc.decode([5, enc.n_vocab + 3, 6]) == enc.decode([5, 6])  # no token there (a padded row): nothing
    # the merges as older tokenizers wrote them, "a b" strings: the same encoding
    spec = json.load(open(tmp_path / "tokenizer.json"))
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    old = tokenizer.from_json(json.dumps(spec).encode())
    assert [old.encode(s, allowed_special="all") for s in TOK_STRINGS] == [enc.encode(s, allowed_special="all")
                                                                           for s in TOK_STRINGS]


def test_tokenizer_json_of_another_kind_stops_with_one_line(tmp_path):
    from pretrained import tokenizer
    train_bpe_tokenizer(tmp_path / "tokenizer.json")
    good = json.load(open(tmp_path / "tokenizer.json"))
    vocab, merges = good["model"]["vocab"], good["model"]["merges"]
    a, b = "".join(merges[10]), "".join(merges[11])
    swapped = copy.deepcopy(good)
    swapped["model"]["vocab"][a], swapped["model"]["vocab"][b] = vocab[b], vocab[a]
    orphan = copy.deepcopy(good)
    orphan["model"]["vocab"]["zzq"] = max(vocab.values()) + 1
    cases = {
        "WordPiece tokenizer": dict(good, model=dict(type="WordPiece", vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
        "Unigram tokenizer": dict(good, model=dict(type="Unigram", vocab=[["a", -1.0]])),
        "not JSON": b"\x80 not json",
        "no model.vocab": dict(version="1.0"),
        "pre-tokenizer is Metaspace": dict(good, pre_tokenizer=dict(type="Metaspace", replacement="\u2581")),
        "add_prefix_space true": dict(good, pre_tokenizer=dict(good["pre_tokenizer"], add_prefix_space=True)),
        "decoder is WordPiece": dict(good, decoder=dict(type="WordPiece")),
        "normalizer is Lowercase": dict(good, normalizer=dict(type="Lowercase")),
        "not in the byte-level alphabet": dict(good, model=dict(good["model"], vocab={**vocab, "\u2581the": 9999})),
        "not above the previous merge's": swapped,
        "made by no merge": orphan,
        "byte 0x41 is not a token": dict(good, model=dict(good["model"], vocab={k: v for k, v in vocab.items()
                                                                                 if k != "A"}, merges=[])),
    }
    for want, spec in cases.items():
        data = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
        with pytest.raises(ValueError) as e:
            tokenizer.from_json(data, where="x/tokenizer.json")
        msg = str(e.value)
        assert want in msg and "\n" not in msg and msg.startswith("x/tokenizer.json: ") and "valid: " in msg, msg
    # a Split pre-tokenizer with a regex (as Llama 3's), the pattern GPT-2's: the same ids as ByteLevel's
    split = dict(good, pre_tokenizer=dict(type="Sequence", pretokenizers=[
        dict(type="Split", pattern=dict(Regex=tokenizer.BYTE_LEVEL_PAT), behavior="Isolated", invert=False),
        dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=False)]))
    enc, by_split = tokenizer.load(str(tmp_path / "tokenizer.json")), tokenizer.from_json(json.dumps(split).encode())
    assert [by_split.encode_ordinary(s) for s in TOK_STRINGS] == [enc.encode_ordinary(s) for s in TOK_STRINGS]
    gaps = copy.deepcopy(split)
    gaps["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+"  # drops all but letters
    with pytest.raises(ValueError, match="leaves characters unmatched"):
        tokenizer.from_json(json.dumps(gaps).encode())


def test_tinystories_data_with_a_tokenizer_json_end_to_end(tmp_path):
    """--encoding=DIR: the tokens are tokenizers' ids after an <|endoftext|> each; meta.json records the
    file (path, source, sha256) and readout.tokenizer rebuilds the encoding from it, from the source
    directory once the recorded path is gone, and refuses a file of another hash."""
    import unicodedata
    src = tmp_path / "model"
    src.mkdir()
    theirs = train_bpe_tokenizer(src / "tokenizer.json")
    docs = [s for s in TOK_STRINGS if s.strip() and "<|" not in s and "|>" not in s]
    (tmp_path / "in.txt").write_text("<|endoftext|>".join(docs))
    meta = td.prepare(str(tmp_path / "data"), input=str(tmp_path / "in.txt"), encoding=str(src), val_every=2)
    spec = meta["encoding"]
    assert spec == dict(kind="hf", source=str(src), path=str(src / "tokenizer.json"),
                        sha256=hashlib.sha256((src / "tokenizer.json").read_bytes()).hexdigest())
    assert meta["eot"] == 0 and meta["vocab_size"] == theirs.get_vocab_size()
    assert json.load(open(tmp_path / "data" / "meta.json")) == meta
    assert not [f for f in os.listdir(tmp_path / "data") if f.endswith(".tmp")]
    train_tokens, val_tokens, _ = td.load_tokens(str(tmp_path / "data"))
    docs = td.read_docs(str(tmp_path / "in.txt"))
    want = [t for d in docs[0::2] for t in [0] + theirs.encode(d, add_special_tokens=False).ids]
    assert train_tokens.tolist() == want
    encode, decode, render = readout.tokenizer(dict(kind="lm", data=dict(meta=meta)))  # as steer, topics, browse
    for d in docs:
        ids = encode(d)
        assert ids == [0] + theirs.encode(d, add_special_tokens=False).ids
        assert td.make_encoding(spec).decode(ids[1:]) == theirs.decode(ids[1:]) == unicodedata.normalize("NFC", d)
    assert render(encode(docs[0])) == "|" + docs[0] and decode(encode("a  b"))[2] == "  "  # an added token
    assert decode([meta["vocab_size"], meta["vocab_size"] + 26]) == ["\ufffd"] * 2  # padded rows of a head
    assert td.make_encoding(spec).decode(val_tokens.tolist()).split("<|endoftext|>")[1] == docs[1]
    moved = dict(spec, path=str(tmp_path / "gone" / "tokenizer.json"))  # rebuilt from the source directory
    assert td.make_encoding(moved).encode_ordinary(docs[0]) == theirs.encode(docs[0]).ids
    (src / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes() + b"\n")
    with pytest.raises(ValueError, match="not the tokenizer.json the data was made with"):
        td.make_encoding(spec)
    for bad, why in (("no/such-model-dir-or-id-here!", "valid: gpt2, bytes, words"),
                     (str(tmp_path), "a local directory without tokenizer.json")):
        with pytest.raises((ValueError, OSError), match=why):
            td.prepare(str(tmp_path / "d2"), input=str(tmp_path / "in.txt"), encoding=bad)
    no_eot = json.load(open(src / "tokenizer.json"))
    no_eot["added_tokens"] = [t for t in no_eot["added_tokens"] if t["content"] != "<|endoftext|>"]
    no_eot["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "other.json").write_text(json.dumps(no_eot))
    with pytest.raises(ValueError, match=r"no special token <\|endoftext\|>"):
        td.prepare(str(tmp_path / "d3"), input=str(tmp_path / "in.txt"), encoding=str(tmp_path / "other.json"))


def test_hub_fetches_the_tokenizer_json_with_the_model_and_the_data_records_it(fake_hub, tmp_path, monkeypatch):
    train_bpe_tokenizer(tmp_path / "tokenizer.json")
    data = (tmp_path / "tokenizer.json").read_bytes()
    add_model(fake_hub)
    fake_hub.files["/owner/tiny/resolve/main/tokenizer.json"] = data  # in git: its ETag is the blob's sha1
    path = hub.model_dir("owner/tiny")
    assert open(os.path.join(path, "tokenizer.json"), "rb").read() == data
    n = len(fake_hub.log)
    assert hub.tokenizer_file("owner/tiny") == os.path.join(path, "tokenizer.json") and len(fake_hub.log) == n
    add_model(fake_hub, repo="owner/plain")  # a repository without one: the model still downloads
    assert sorted(os.listdir(hub.model_dir("owner/plain"))) == ["config.json", "model.safetensors"]
    with pytest.raises(hub.HubError) as e:
        hub.tokenizer_file("owner/plain")
    assert "tokenizer.json: no such file" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "in.txt").write_text("One story.\n\nAnother story.\n\nA third one.")
    meta = td.prepare(str(tmp_path / "data"), input=str(tmp_path / "in.txt"), encoding="owner/tiny", val_every=3)
    assert meta["encoding"]["source"] == "owner/tiny@main" and meta["encoding"]["path"].startswith(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # later, offline: rebuilt from the cache
    enc = td.make_encoding(meta["encoding"])
    assert td.load_tokens(str(tmp_path / "data"))[0].tolist() == [0, *enc.encode_ordinary("One story."), 0,
                                                                  *enc.encode_ordinary("Another story.")]
    with pytest.raises(hub.HubUnreachable, match="offline, pass a local directory holding tokenizer.json"):
        hub.tokenizer_file("owner/unseen")


# -----------------------------------------------------------------------------
# common.py: progress


def test_progress_in_a_log_prints_lines(capsys):
    """With stderr not a terminal (as under pytest, or nohup), progress is a plain line with rate and ETA."""
    bar = common.Progress(10, "train", every=0.0)
    bar.set_postfix(loss="1.0")
    for _ in range(10):
        bar.update()
    bar.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("train: 10/10 (100%)")
    assert "it/s" in lines[0] and "ETA" in lines[0] and lines[0].endswith("loss 1.0")


# -----------------------------------------------------------------------------
# distributed.py: torchrun's environment, DDP over gloo, two processes on the CPU


DDP_RUN = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, num_codes=256, batch_size=8,
               gradient_accumulation_steps=2, max_iters=6, eval_interval=3, eval_seqs=8, state_seqs=4,
               warmup_iters=1, cb_warmup=2, replace_every=2, log_interval=1, decay_lr=False)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ddp_worker(rank, world, ports, out):
    """One rank, as torchrun would start it: trains DDP_RUN, then saves its final model and optimiser, and
    the usage counts before and after every reduction over ranks, for the test to compare. Then the same
    run again in two parts, stopped at step 5 and resumed (out/resumed)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    sys.stdout = open(os.path.join(out, f"log{rank}.txt"), "w", buffering=1)
    built, reductions = [], []
    make_optimizer, reduce_usage = train.make_optimizer, distributed.reduce_usage

    def recording_optimizer(model, *args):  # train() makes one for every model it builds: the last is trained
        built.append((model, make_optimizer(model, *args)))
        return built[-1][1]

    def recording_reduce(model, world):
        def usage():
            return {n: (cb.uses_since_read.clone(), cb.uses_since_reset.clone()) for n, cb in model.codebooks().items()}
        before = usage()
        reduce_usage(model, world)
        reductions.append((before, usage()))

    train.make_optimizer, distributed.reduce_usage = recording_optimizer, recording_reduce
    train.train(train.TrainConfig(out_dir=out, **DDP_RUN))
    model, optimizer = built[-1]
    torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), reductions=reductions),
               os.path.join(out, f"rank{rank}.pt"))
    train.make_optimizer, distributed.reduce_usage = make_optimizer, reduce_usage
    # a new port for each run: rank 1 may ask for the next group before rank 0 has let go of its last one
    for port, max_iters, resume in ((ports[1], 5, False), (ports[2], 6, True)):
        os.environ["MASTER_PORT"] = str(port)
        cfg = dict(DDP_RUN, out_dir=os.path.join(out, "resumed"), max_iters=max_iters, resume=resume)
        train.train(train.TrainConfig(**cfg), {"resume", "max_iters"} if resume else ())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(ddp_worker, args=(2, free_ports(3), str(out)), nprocs=2)
    return out

@pytest.mark.slow
def test_two_gloo_processes_keep_codebooks_identical(ddp_run):
    """Codebooks inserted by k-means at step 2, dead codes replaced at step 4, 2 processes x 2 micro-steps:
    every weight, code, LayerNorm and Adam moment ends bitwise equal on both ranks, and the counts that rank
    0 reports are the sum of both ranks' counts."""
    r0, r1 = (torch.load(ddp_run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    usage = ("uses_since_read", "uses_since_reset", "mse_sum", "mse_n")
    assert any(name.endswith(".codebook") for name in r0["model"])
    for name, value in r0["model"].items():
        if not name.endswith(usage):
            assert torch.equal(value, r1["model"][name]), name
    for p, s in r0["optimizer"]["state"].items():
        for key, value in s.items():
            assert torch.equal(value, r1["optimizer"]["state"][p][key]), (p, key)
    # the weights kept their Adam state through the insertion (6 steps), the codes and their LNs are new (4)
    assert sorted({float(s["step"]) for s in r0["optimizer"]["state"].values()}) == [4.0, 6.0]
    log = (ddp_run / "log0.txt").read_text()
    assert "2 processes" in log and "step 2: inserted codebooks (L0.attn, L0.mlp), k-means initialised" in log
    replaced = int(re.search(r"step 4: replaced (\d+) dead codes", log).group(1))
    assert (ddp_run / "log1.txt").read_text() == ""  # rank 0 speaks for all
    # reductions at step 3 (eval), 4 (dead codes), 6 (eval): rank 0 then holds the sum, rank 1 nothing
    (red0, red1) = r0["reductions"], r1["reductions"]
    assert len(red0) == len(red1) == 3
    for (before0, after0), (before1, after1) in zip(red0, red1):
        for site, (counts, fired) in after0.items():
            assert torch.equal(counts, before0[site][0] + before1[site][0])
            assert torch.equal(fired, before0[site][1] + before1[site][1])
            assert not after1[site][0].any() and not after1[site][1].any()
    # the counts cover the global batch, 8 sequences x 15 positions a step, since the last read (and reset)
    # at an eval: 1 step since insertion at step 3, then 1 at step 4, 3 at step 6
    for (_, after), steps in zip(red0, (1, 1, 3)):
        for site, (counts, _) in after.items():
            groups = 2 if site.endswith("attn") else 1
            assert torch.equal(counts.view(groups, -1).sum(1), torch.full((groups,), 8.0 * 15 * steps)), site
    # dead codes: those that fired on neither rank (rank 0 alone would have called more of them dead)
    assert replaced == sum(int((fired == 0).sum()) for _, fired in red0[1][1].values()) > 0
    assert replaced < sum(int((fired == 0).sum()) for _, fired in red0[1][0].values())
    metrics = json.load(open(ddp_run / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["config"]["gradient_accumulation_steps"] == 2
    for site, (counts, _) in red0[2][1].items():
        assert metrics["alive"][site] == pytest.approx((counts > 0).float().mean().item())
    ckpt = common.load_checkpoint(str(ddp_run / "ckpt.pt"))
    assert ckpt["world_size"] == 2 and len(ckpt["data_rngs"]) == 2
    assert not torch.equal(ckpt["data_rngs"][0], ckpt["data_rngs"][1])  # a stream per rank
    for name, value in r0["model"].items():
        assert torch.equal(value, ckpt["model"][name]), name
    # stopped at step 5 and resumed on 2 processes: each rank's data stream continues, the same model
    resumed = common.load_checkpoint(str(ddp_run / "resumed" / "ckpt.pt"))
    assert resumed["iter_num"] == 6
    for name, value in ckpt["model"].items():
        if not name.endswith(usage):
            assert torch.equal(value, resumed["model"][name]), name

@pytest.mark.slow
def test_ddp_checkpoint_resumes_in_one_process_and_loads_in_steer(ddp_run, tmp_path, capsys):
    shutil.copy(ddp_run / "ckpt.pt", tmp_path / "ckpt.pt")
    cfg, given = common.parse_args([f"--out_dir={tmp_path}", "--resume=True", "--max_iters=8"], train.TrainConfig,
                                   train.PRESETS)
    m = train.train(cfg, given)
    assert "it ran on 2 process(es), this on 1: the data differ from an unbroken run" in capsys.readouterr().out
    assert m["iters"] == 8 and m["world_size"] == 1 and m["config"]["batch_size"] == 8
    out = steer.main(["usage", f"--ckpt={ddp_run / 'ckpt.pt'}", "--device=cpu"])
    assert set(out) >= {"L0.attn", "L0.mlp"}

@pytest.mark.slow
def test_torchrun_bad_input_is_one_line_error(ddp_run, tmp_path, monkeypatch, capsys):
    """Checked before any process joins the group, so every rank stops at once with the same line."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    shutil.copy(ddp_run / "ckpt.pt", tmp_path / "ckpt.pt")
    for cfg, msg in (
            (tiny_cfg(tmp_path / "a", batch_size=8), "--batch_size=8 does not split over 3 process(es) x 1 "),
            (tiny_cfg(tmp_path / "b", batch_size=6, device="cuda"), "--device=cuda: 2 GPU(s) on this machine for 3 "
             "processes; use --nproc_per_node=2 or --device=cpu"),
            (train.TrainConfig(out_dir=str(tmp_path), resume=True), "cannot resume: --batch_size=8 does not split "
             "over 3 process(es) x 2 accumulation step(s)")):
        with pytest.raises(SystemExit) as e:
            train.train(cfg)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1, err


# -----------------------------------------------------------------------------
# benchmarks/: search.py, finetune.py and gpu_report.py


def test_reference_matches_layer():
    """benchmarks.search's official-style reference and CodebookLayer: same ids, outputs and gradients."""
    torch.manual_seed(0)
    N, G, d, C, k = 64, 4, 8, 50, 3
    layer = CodebookLayer(G * d, C, k, G)
    with torch.no_grad():
        layer.ln_weight.uniform_(0.5, 1.5)
        layer.ln_bias.normal_()
    ref = bench.Reference(layer)
    x = torch.randn(N, G * d)
    grad = torch.randn(N, G * d)
    results = []
    for model in (layer, ref):
        xi = x.clone().requires_grad_()
        out, ids = model(xi)
        out.backward(grad)
        results.append((out.detach(), ids.reshape(N, G, k), xi.grad))
    (out_a, ids_a, gx_a), (out_b, ids_b, gx_b) = results
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(gx_a, gx_b)
    torch.testing.assert_close(layer.codebook.grad, torch.stack([p.grad for p in ref.codebooks]))
    torch.testing.assert_close(layer.ln_weight.grad, torch.stack([ln.weight.grad for ln in ref.lns]))
    torch.testing.assert_close(layer.ln_bias.grad, torch.stack([ln.bias.grad for ln in ref.lns]))
    assert layer.codebook.grad.abs().sum() > 0


def run_quick(module, tmp_path):
    """A benchmark's --quick run (python -m module) into tmp_path -> (its stdout, the JSON it wrote)."""
    path = tmp_path / (module.split(".")[-1] + ".json")
    proc = subprocess.run([sys.executable, "-m", module, "--quick", f"--out={path}"],
                          capture_output=True, text=True, cwd=HERE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(path.read_text())


@pytest.mark.slow
def test_bench_quick_writes_json(tmp_path):
    out, result = run_quick("benchmarks.search", tmp_path)
    assert "train_overhead" in out
    shape = result["shapes"]["tiny"]
    assert set(shape["rows"]) == {"reference", "layer", "plain", "matmul"}  # --quick skips the compiled row
    for row in ("reference", "layer", "plain"):
        assert shape["rows"][row]["fwdbwd_ms"] > 0 and shape["rows"][row]["peak_mb"] is not None
    assert shape["rows"]["matmul"]["fwd_ms"] > 0
    assert set(shape["ratios"]) >= {"speedup_vs_reference", "vs_matmul", "memory_vs_reference", "plain_vs_layer"}
    assert all(v > 0 for v in shape["ratios"].values())
    assert result["train_overhead"] > 0
    assert result["train"]["plain"]["config"]["cb_at"] == "none"
    assert result["train"]["codebook"]["us_per_token"] > 0
    # the parts of the quick model's 2 sites (1 layer, attention and MLP): layers, searches, score matmuls
    for part in ("codebook_layers", "searches", "score_matmuls"):
        assert result["train"][part]["sites"] == 2 and result["train"][part]["us_per_token"] > 0, part
    assert result["train_overhead_floor"] > 1


def test_bench_trains_train_pys_preset():
    """benchmarks.search writes the default fsm preset out (it may not import train.py): the two must agree."""
    defaults = dataclasses.asdict(train.TrainConfig(**train.PRESETS["fsm"]))
    assert {k: defaults[k] for k in bench.TRAIN} == bench.TRAIN


def test_bench_finetune_is_a_script_of_its_own(capsys):
    """The search's --finetune names the finetune's own command; that one takes its flags and --quick's
    single step, and rejects the search's flags with the list of its own."""
    with pytest.raises(SystemExit) as e:
        bench.parse(["--finetune", "--quick"])
    assert "python -m benchmarks.finetune" in str(e.value.code) and "\n" not in str(e.value.code)
    cfg = finetune.parse(["--quick", "--finetune_batch=2"])
    assert (cfg.quick, cfg.train_steps, cfg.finetune_batch) == (True, 1, 2)
    with pytest.raises(SystemExit) as e:
        finetune.parse(["--shapes=tiny"])
    err = capsys.readouterr().err  # helpers.common.parse_flags's one line
    assert e.value.code == 2 and "--shapes" in err and "finetune_batch" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_gpu_report_small_runs_every_step(tmp_path):
    """benchmarks.gpu_report --size=small: every step in its own process, figures parsed, one JSON named after
    the device (as benchmarks.search names it); the fused search may be skipped where it cannot run, saying why."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a CPU skips the fused search
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", "--size=small",
                           f"--out_dir={tmp_path}", f"--work_dir={tmp_path / 'work'}"],
                          capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_report_*.json")
    report = json.loads(path.read_text())
    steps = report["steps"]
    assert list(steps) == ["bench", "bench_fused", "fsm_paper", "tinystories", "torchrun", "tests"]
    assert report["complete"] and report["failed"] == [] and report["versions"]["torch"] == torch.__version__
    name = steps["bench"]["figures"]["device_name"]
    assert report["device_name"] == name
    assert path.name == "gpu_report_" + re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") + ".json"
    assert len(report["load_before"]) == len(report["load_after"]) == 3
    for run, step in steps.items():
        assert step["wall_s"] > 0 and os.path.exists(step["log"]) and step["tail"]
        if step["status"] == "skipped":  # only the fused search, only with the search's one-line reason
            assert run == "bench_fused" and step["rc"] != 0 and "needs Triton" in step["reason"]
        else:
            assert step["status"] == "ok" and step["rc"] == 0, step
    assert steps["tests"]["figures"]["passed"] == 1 and "failed" not in steps["tests"]["figures"]
    assert "gpu_report" in steps["tests"]["command"]  # the selection leaves this test out: no recursion
    assert steps["bench"]["figures"]["train_overhead"] > 0
    assert steps["bench"]["figures"]["train"]["codebook"]["us_per_token"] > 0
    for run in ("fsm_paper", "tinystories", "torchrun"):
        fig = steps[run]["figures"]
        assert fig["step_ms"] > 0 and fig["tokens_per_s"] > 0 and fig["world_size"] == 1, (run, fig)
        assert not os.path.exists(tmp_path / "work" / run / "ckpt.pt")  # scratch, removed
    assert abs(steps["tinystories"]["figures"]["val_loss"] - math.log(50257)) < 1  # uniform ids: ~ln(vocab)
    assert steps["fsm_paper"]["figures"]["bayes_loss"] > 1 and "torch.distributed.run" in steps["torchrun"]["command"]


# -----------------------------------------------------------------------------
# how the files stand


METHOD = {"codebook", "model", "fsm_data", "tinystories_data"}  # the reader's path (the data files also run)
SCRIPTS = {"train", "steer", "topics", "browse", "benchmarks.search", "benchmarks.finetune", "benchmarks.generate",
           "benchmarks.jobs", "benchmarks.gpu_report"}  # run by users
FOLDERS = {"tuned": {"tiled", "triton_kernels"}, "pretrained": {"load", "hub", "tokenizer"},
           "helpers": {"common", "cpu_threads", "distributed", "readout", "train_data", "checkpoints", "evaluation",
                       "topic_text"},
           "benchmarks": {"search", "finetune", "generate", "jobs", "gpu_report", "measure"}}
MOVED = {"bench": "benchmarks.search", "bench_generate": "benchmarks.generate", "bench_jobs": "benchmarks.jobs",
         "gpu_report": "benchmarks.gpu_report"}  # old commands, which now stop with a line naming the new one


def local_imports(name):
    """The repository's modules that module `name` (dotted, e.g. tuned.tiled) imports, dotted."""
    import ast
    file = os.path.join(HERE, *name.split("."))
    tree = ast.parse(open(file + ("/__init__.py" if os.path.isdir(file) else ".py")).read())
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            found |= {f"{n.module}.{a.name}" if os.path.exists(os.path.join(HERE, n.module, a.name + ".py"))
                      else n.module for a in n.names}
    return {m for m in found if os.path.exists(os.path.join(HERE, *m.split(".")) + ".py")
            or os.path.isdir(os.path.join(HERE, m))}


def test_the_layout_puts_the_method_first_and_nothing_imports_a_script():
    """The top level holds the method's files, the scripts and the stubs of moved commands; every other file
    sits in a folder with an __init__.py saying what it holds. codebook.py imports only torch; no module
    imports a script or imports in a circle."""
    top = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("test_")}
    assert top == METHOD | {s for s in SCRIPTS if "." not in s} | set(MOVED), top
    modules = set(METHOD) | SCRIPTS
    for folder, allowed in FOLDERS.items():
        here = {f[:-3] for f in os.listdir(os.path.join(HERE, folder)) if f.endswith(".py")}
        assert "__init__" in here and here - {"__init__"} <= allowed, (folder, here)
        modules |= {f"{folder}.{m}" for m in here - {"__init__"}} | {folder}
    assert local_imports("codebook") == set() and local_imports("model") == {"codebook"}
    graph = {m: local_imports(m) for m in modules}
    for m, deps in graph.items():
        assert not deps & SCRIPTS, f"{m} imports the script(s) {deps & SCRIPTS}"
    done, path = set(), []

    def visit(m):  # depth first: a module met again on the current path closes a circle
        assert m not in path, f"an import circle: {' -> '.join(path + [m])}"
        if m not in done:
            path.append(m)
            for d in graph.get(m, ()):
                visit(d)
            path.pop()
            done.add(m)
    for m in graph:
        visit(m)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_command_names_the_new_one(old):
    out = subprocess.run([sys.executable, f"{old}.py", "--quick"], capture_output=True, text=True, cwd=HERE)
    assert out.returncode != 0 and f"python -m {MOVED[old]}" in out.stderr and out.stdout == "", out


def test_every_script_sets_how_openmp_waits_before_torch_loads():
    """cpu_threads must come first: GNU OpenMP reads GOMP_SPINCOUNT once, when torch loads it."""
    import ast
    for name in SCRIPTS:
        tree = ast.parse(open(os.path.join(HERE, *name.split(".")) + ".py").read())
        first = next(n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
        assert isinstance(first, ast.Import) and first.names[0].name == "helpers.cpu_threads", name
    code = "import helpers.cpu_threads, os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    for extra, want in (({}, "10000 None"), ({"GOMP_SPINCOUNT": "5"}, "5 None"),
                        ({"OMP_WAIT_POLICY": "passive"}, "None passive")):  # a user's own setting is kept
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                             env={**env, **extra}, check=True).stdout.strip()
        assert out == want, (extra, out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap settings are Linux's")
def test_cpu_threads_keeps_the_heap_between_steps():
    """cpu_threads' mallopt: eight 4 MB tensors allocated and freed, again and again as a training step
    does, come from the kept heap, not from fresh pages (8,192 page faults a round); a user's own MALLOC_
    setting is kept (glibc's default trim threshold, 128 KB, gives the faults back)."""
    code = ("import helpers.cpu_threads, resource, torch\n"
            "for i in range(12):\n"
            "    if i == 2:\n"
            "        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    xs = [torch.ones(1 << 20) for _ in range(8)]\n"
            "    del xs\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // 10)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults = {}
    for name, extra in (("ours", {}), ("user's", {"MALLOC_TRIM_THRESHOLD_": "131072"})):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                             env={**env, **extra}, check=True).stdout
        faults[name] = int(out)
    assert faults["ours"] < 200 and faults["user's"] > 4000, faults
