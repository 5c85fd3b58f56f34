"""
Tests of steer.py: the precision / recall / threshold / JSD arithmetic on hand-made cases, code
addresses, forcing codes, and the CLI's errors. Offline, CPU, tiny shapes, fixed seeds:

    OMP_NUM_THREADS=1 python -m pytest -q test_steer.py
"""

import copy
import dataclasses
import math

import pytest
import torch

import steer
import train
from codebook import Intervention
from fsm_data import FSM
from model import format_code, parse_code

# -----------------------------------------------------------------------------
# a tiny checkpoint in train.py's layout: 12 states (2 digits), 3 edges, 2 layers


def save_tiny(path, kind="fsm", k=1):
    cfg = train.TrainConfig(out_dir=str(path.parent), num_states=12, num_edges=3, n_layer=2, n_head=2, n_embd=32,
                            block_size=32, num_codes=64, k=k)
    torch.manual_seed(0)
    fsm = FSM(cfg.num_states, cfg.num_edges, seed=cfg.fsm_seed)
    model = train.build_model(cfg, fsm.vocab_size)
    opt = train.make_optimizer(model, cfg, "cpu")
    train.save_checkpoint(str(path), dict(
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


# -----------------------------------------------------------------------------
# the arithmetic, on hand-made cases


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
    assert steer.flat_ids(codes, 10).tolist() == [[3, 13]]
    assert steer.code_name("L1.attn", 13, 10) == "L1.attn.h1:3"


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


# -----------------------------------------------------------------------------
# code addresses and forcing


def test_code_address_round_trip_and_errors():
    for s in ("L2.attn.h3:417", "L0.mlp:88", "L11.attn.h0:0"):
        assert format_code(*parse_code(s)) == s
    assert parse_code("L2.mlp:88") == ("L2.mlp", 0, 88)
    for bad in ("L2.mlp", "L2.mlp:", "L2.foo:3", "L2.mlp:-1", "2.mlp:3", "L2.mlp.h1:x"):
        with pytest.raises(ValueError):
            parse_code(bad)


def test_forcing_a_code_equals_a_codebook_that_only_has_it(ckpt):
    model = train.model_from_checkpoint(train.load_checkpoint(ckpt)).eval()
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


def test_patching_own_codes_changes_nothing(tmp_path):
    model = train.model_from_checkpoint(train.load_checkpoint(save_tiny(tmp_path / "ckpt.pt", k=2))).eval()
    x = torch.tensor([[10, 1, 2, 0, 3], [10, 0, 4, 1, 1], [10, 1, 1, 0, 2]])
    logits, _, codes, _ = model(x)
    last = {s: c[:, -1] for s, c in codes.items()}  # (B, G, k)
    probs, greedy = steer.patched_run(model, x, last, list(last), 2, 10)
    assert torch.allclose(probs, torch.softmax(logits[:, -1], -1), atol=1e-6)
    assert greedy.shape == (3, 2) and (greedy < 10).all()
    other = {s: c.flip(0) for s, c in last.items()}  # the codes of other rows do change the output
    assert not torch.allclose(steer.patched_run(model, x, other, list(last), 0, 10)[0], probs)


# -----------------------------------------------------------------------------
# the commands on the tiny checkpoint


def test_states_patch_usage_search_generate_run(ckpt, capsys):
    common = [f"--ckpt={ckpt}", "--batch_size=16"]
    out = steer.main(["states", "--n_seqs=24", "--min_count=1"] + common)
    assert out["site"] in ("L0.attn", "L0.mlp", "L1.attn", "L1.mlp")
    assert 0 < out["code_precision"] <= 1 and 0 < out["code_recall"] <= 1 and 0 < out["neuron_precision"] <= 1
    assert len(out["per_state"]) == 12
    out = steer.main(["patch", "--pairs=30", "--ctx_states=3"] + common)
    assert out["jsd"]["none"] == 1.0 and {"all", "all_mlp", "all_attn", "L1.mlp"} <= set(out["jsd"])
    assert 0 <= out["force_success"] <= 1
    out = steer.main(["usage", "--n_seqs=8"] + common)
    assert 0 < out["L0.mlp"]["alive"] <= 1 and sum(out["L0.mlp"]["histogram"].values()) == 64
    # BOS is at position 0 of every sequence, where every codebook sees the same input: recall 1
    out = steer.main(["search", r"\|", "--n_seqs=8"] + common)
    assert out["matches"] == 8 and out["codes"][0]["recall"] == 1.0
    out = steer.main(["show", out["codes"][0]["code"], "--n_seqs=8", "--top=3"] + common)
    assert out["firings"] >= 8 and "[|]" in out["top"][0]["text"]
    out = steer.main(["generate", "--prompt=0105", "--force=L1.mlp:3", "--at=new", "--n=2", "--max_new_tokens=6"] + common)
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
