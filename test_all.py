"""
The test suite: offline, CPU, tiny shapes, fixed seeds.

    python -m pytest -q test_all.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from codebook import CodebookLayer, Intervention, apply_interventions, search
from fsm_data import FSM
from model import GPT, GPTConfig, format_code, make_interventions, parse_code

HERE = os.path.dirname(os.path.abspath(__file__))


def brute_topk(x, codebook, k):
    """Reference search: the full (N, G, C) cosine score matrix at once."""
    codes = codebook / codebook.norm(dim=-1, keepdim=True)
    scores = torch.einsum("ngd,gcd->ngc", x, codes)
    return scores.topk(k, dim=-1).indices


# -----------------------------------------------------------------------------
# the codebook layer


@pytest.mark.parametrize("k,groups", [(1, 1), (1, 4), (4, 1), (4, 4)])
def test_search_matches_brute_force(k, groups):
    torch.manual_seed(0)
    x = torch.randn(300, groups, 8)
    cb = torch.randn(groups, 97, 8) * torch.rand(groups, 97, 1) * 3  # norms vary: cosine, not dot product
    ids = search(x, cb, k)
    assert ids.shape == (300, groups, k) and ids.dtype == torch.int64
    assert torch.equal(ids, brute_topk(x, cb, k))
    # cosine: the ranking ignores code norms, so a dot-product search would differ here
    assert not torch.equal(torch.einsum("ngd,gcd->ngc", x, cb).topk(k, -1).indices, ids)


@pytest.mark.parametrize("max_elems", [97 * 4, 50, 4])  # token chunks; token and code chunks; tiny
def test_chunked_search_equals_unchunked(max_elems):
    torch.manual_seed(1)
    x = torch.randn(257, 4, 8)
    cb = torch.randn(4, 97, 8)
    for k in (1, 3):
        assert torch.equal(search(x, cb, k, max_elems=max_elems), search(x, cb, k, max_elems=1 << 30))


def test_compiled_search_equals_eager():
    torch.manual_seed(2)
    x = torch.randn(64, 2, 8)
    cb = torch.randn(2, 50, 8)
    for k in (1, 3):
        assert torch.equal(search(x, cb, k, compile=True), search(x, cb, k, compile=False))


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
    assert torch.equal(layer.counts.view(2, 10), expect)
    s = layer.stats()
    assert s["alive"] == pytest.approx((expect > 0).float().mean().item())
    p = expect / expect.sum(-1, keepdim=True)
    ent = -(p * torch.log2(p.clamp_min(1e-30))).sum(-1).mean().item()
    assert s["entropy"] == pytest.approx(ent, abs=1e-5)
    assert layer.counts.sum() == 0  # read resets the window
    layer.eval()(x)
    assert layer.counts.sum() == 0  # inference does not count


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
    assert layer.fired.sum() == 0
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
# the model


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
    for s in ("L2.attn.h3:417", "L0.mlp:88"):
        assert format_code(*parse_code(s)) == s
    for bad in ("L2.attn:h3:1", "2.mlp:1", "L1.mlp", "L1.resid:3", "L1.mlp:-1"):
        with pytest.raises(ValueError, match="bad code address"):
            parse_code(bad)
    m = tiny_model()
    for bad, msg in (("L5.mlp:1", "no codebook"), ("L0.attn.h2:1", "head 2"), ("L0.mlp:12", "out of range")):
        with pytest.raises(ValueError, match=msg):
            m.check_intervention(make_interventions([bad])[0])


def test_forcing_in_generate_changes_next_token_distribution():
    m = tiny_model().eval()
    idx = torch.randint(11, (1, 6))
    base = F.softmax(m(idx)[0][0, -1], -1)
    _, _, codes, _ = m(idx)
    current = int(codes["L1.mlp"][0, -1, 0, 0])
    other = (current + 1) % 12
    iv = make_interventions([f"L1.mlp:{other}"], positions=[5])
    logits, _, codes2, _ = m(idx, interventions=iv)
    assert int(codes2["L1.mlp"][0, -1, 0, 0]) == other
    # forcing the last MLP code is the same as adding (new code - old code) through c_proj... i.e. the
    # final residual moves by exactly that difference before ln_f
    assert not torch.allclose(F.softmax(logits[0, -1], -1), base)
    g = torch.Generator().manual_seed(0)
    out = m.generate(idx, 3, interventions=iv, generator=g)
    assert out.shape == (1, 9) and torch.equal(out[:, :6], idx)
    with pytest.raises(ValueError, match="exceed block_size"):
        m.generate(idx, 12)


# -----------------------------------------------------------------------------
# TokFSM


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


# -----------------------------------------------------------------------------
# training: checkpoints, resume, bad input


def tiny_cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), n_layer=1, n_head=2, n_embd=16, block_size=16, num_codes=16,
                batch_size=4, max_iters=4, eval_interval=2, eval_seqs=8, state_seqs=4, warmup_iters=1,
                replace_every=3, log_interval=1)
    base.update(kw)
    return train.TrainConfig(**base)


def test_train_checkpoint_round_trip(tmp_path):
    m = train.train(tiny_cfg(tmp_path))
    saved = json.load(open(tmp_path / "metrics.json"))
    for key in ("val_loss", "val_acc", "state_acc", "bayes_loss", "bayes_acc", "alive", "mse", "iters",
                "wall_s", "tokens_per_s", "config"):
        assert key in saved
    assert saved["iters"] == 4 and set(saved["alive"]) == {"L0.attn", "L0.mlp", "all"} and m["val_loss"] > 0
    ckpt = train.load_checkpoint(str(tmp_path / "ckpt.pt"))  # weights_only=True inside
    model = train.model_from_checkpoint(ckpt).eval()
    fsm = FSM()
    val = fsm.sample(8, 16, torch.Generator().manual_seed(ckpt["config"]["seed"] + 1))
    logits, loss, _, _ = model(val[:, :-1], val[:, 1:])
    assert loss.item() == pytest.approx(saved["val_loss"], rel=1e-5)
    again = train.model_from_checkpoint(train.load_checkpoint(str(tmp_path / "ckpt.pt"))).eval()
    assert torch.equal(again(val[:, :-1])[0], logits)


def test_resume_gives_the_same_model(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # a constant learning rate: with decay_lr the schedule depends on max_iters, which resume changes
    train.train(tiny_cfg(a, max_iters=6, decay_lr=False))
    train.train(tiny_cfg(b, max_iters=4, decay_lr=False))
    cfg, given = train.parse_args([f"--out_dir={b}", "--resume=True", "--max_iters=6"])
    train.train(cfg, given)
    sa = torch.load(a / "ckpt.pt", weights_only=True)
    sb = torch.load(b / "ckpt.pt", weights_only=True)
    assert sb["iter_num"] == 6
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key


def run_train(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True,
                          text=True, cwd=HERE, timeout=120)


@pytest.mark.parametrize("args,msg", [
    (["--foo=1"], "unknown key --foo; valid: config, out_dir"),
    (["--k=abc"], "--k=abc: expected int"),
    (["--num_codes=8", "--k=9"], "--k=9: must be <= num_codes=8"),
    (["--cb_at=everything"], "--cb_at=everything: valid: none, attn, mlp, attn+mlp"),
    (["--config=huge"], "unknown preset; valid: fsm, fsm_paper"),
    (["--compile=maybe"], "expected True or False"),
    (["--cb_layers=0,9"], "layers must be in 0..3"),
    (["max_iters=3"], "expected --key=value"),
])
def test_bad_config_is_one_line_error(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cfg, _ = train.parse_args(args)
        train.check(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


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
    ckpt = train.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["model_args"]["cb_at"] == "attn+mlp"
    plain = train.build_model(cfg, 11, "none")
    idx = FSM().sample(4, 16, torch.Generator().manual_seed(0))[:, :-1]
    torch.manual_seed(0)
    with_cb = train.insert_codebooks(plain, cfg, 11, idx)
    for name, p in plain.state_dict().items():
        assert torch.equal(p, with_cb.state_dict()[name])
    cache = {}
    with_cb.eval()(idx, cache=cache)
    cb = with_cb.codebooks()["L0.attn"]
    cb(cache["L0.attn.in"])
    kmeans_mse = cb.last_mse
    with torch.no_grad():
        cb.codebook.normal_()  # the default N(0, 1) init, same LN
    cb(cache["L0.attn.in"])
    assert kmeans_mse < 0.2 * cb.last_mse
