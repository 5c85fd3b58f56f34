"""
Where a training run starts from and what it leaves (train.py): its checkpoint, written with the model, the
optimizer and every random stream so that a resumed run goes on as one; and the base model a finetune
starts from, one of our checkpoints without codebooks or a pretrained hub model, checked against the data.
"""

import dataclasses
import hashlib
import os

import torch

from helpers import distributed
from helpers.common import fail, load_checkpoint, save_checkpoint
from pretrained import hub
from pretrained.load import from_pretrained

GPT2_VOCAB = 50257  # the gpt2 BPE's tokens, which the hub's GPT-2 and GPT-Neo models read
GPT2_KINDS = ("gpt2", "r50k_base")  # meta.json encoding kinds of those tokens


def write_checkpoint(cfg, model, optimizer, it, wall_s, data, data_rngs, world):
    """out_dir/ckpt.pt, atomically, from rank 0, with every rank's data stream (data_rngs)."""
    save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), dict(
        model=model.state_dict(), optimizer=optimizer.state_dict(), iter_num=it,
        config=dataclasses.asdict(cfg), model_args=dataclasses.asdict(model.config), data_rng=data_rngs[0],
        data_rngs=data_rngs, world_size=world.size, wall_s=wall_s, **rng_states(world.device), **data.checkpoint_fields))


def rng_states(device):
    """The generators a resumed run continues besides the data streams: the CPU's and, on a GPU, that
    device's (dead-code replacement draws its picks and noise there)."""
    states = dict(torch_rng=torch.get_rng_state())
    if device.startswith("cuda"):
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(ckpt, device):
    torch.set_rng_state(ckpt["torch_rng"])
    if device.startswith("cuda") and "cuda_rng" in ckpt:  # none: a CPU run's checkpoint, or an older one
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)


def resume(ckpt, cfg, data, world, log):
    """Continue the stored run's random streams: -> (its step, its seconds so far)."""
    restore_rng_states(ckpt, world.device)
    saved = ckpt.get("data_rngs", [ckpt["data_rng"]])  # one per process of the stored run
    it = ckpt["iter_num"]
    try:
        if world.rank < len(saved):  # a rank the stored run did not have starts its own stream
            data.gen.set_state(saved[world.rank])
    except RuntimeError:  # a generator of another device kind (a GPU run resumed on a CPU, or back)
        data.gen.manual_seed(distributed.data_seed(cfg.seed + it, world.rank))
        log("the checkpoint's data streams were drawn on another device: the data differ from an unbroken run")
    log(f"resumed from {os.path.join(cfg.out_dir, 'ckpt.pt')} at step {it}" + ("" if len(saved) == world.size else
        f"; it ran on {len(saved)} process(es), this on {world.size}: the data differ from an unbroken run"))
    return it, ckpt["wall_s"]


def load_optimizer_state(optimizer, model, saved):
    """optimizer.load_state_dict(saved), also from a checkpoint whose decay groups went by shape (before
    make_optimizer chose them by name, the codebooks' (G, d) LayerNorms were decayed): each parameter gets
    its own Adam state, in this version's groups."""
    if [len(g["params"]) for g in saved["param_groups"]] == [len(g["params"]) for g in optimizer.param_groups]:
        return optimizer.load_state_dict(saved)
    named = list(model.named_parameters())
    by_shape = [[p for n, p in named if p.dim() >= 2 and not n.endswith(".codebook")],
                [p for n, p in named if p.dim() < 2], [p for n, p in named if n.endswith(".codebook")]]
    old = torch.optim.AdamW([dict(params=g) for g in by_shape if g], fused=optimizer.defaults["fused"])
    old.load_state_dict(saved)  # its index -> parameter map
    for p, state in old.state.items():
        optimizer.state[p] = state


def load_base(cfg, given):
    """The checkpoint that --init_from names, checked: no codebooks yet, the same kind of data.
    With --cb_at=none it is finetuned as it is: the baseline to compare a finetune with codebooks with."""
    if not os.path.isfile(cfg.init_from) and not cfg.init_from.endswith(".pt"):  # a hub id or directory
        base = load_pretrained(cfg, given)
    else:
        try:
            base = load_checkpoint(cfg.init_from)
        except (FileNotFoundError, ValueError) as e:
            fail(f"--init_from: {e}")
    if base["model_args"]["cb_at"] != "none":
        fail(f"--init_from inserts codebooks into a model without them: {cfg.init_from} has cb_at="
             f"{base['model_args']['cb_at']}")
    if base.get("kind") != ("lm" if cfg.data_dir else "fsm"):
        fail(f"--init_from={cfg.init_from} was trained on kind={base.get('kind')!r} data")
    shape = ("n_layer", "n_head", "n_embd", "block_size")
    changed = [k for k in shape if k in given and getattr(cfg, k) != base["config"][k]]
    if changed:
        fail(f"--init_from: {', '.join(changed)} differ from the checkpoint's (its shape is kept)")
    return base


def load_pretrained(cfg, given):
    """A hub model (pretrained.load.from_pretrained) in the shape of a checkpoint without codebooks. Its block_size: the
    model's (TinyStories: 512), or --block_size given on the command line, up to the model's positions."""
    if not cfg.data_dir:
        fail(f"--init_from={cfg.init_from}: a pretrained language model needs token data (--data_dir)")
    try:
        model = from_pretrained(cfg.init_from, cfg.block_size if "block_size" in given else None)
    except (ValueError, OSError) as e:
        fail(f"--init_from={cfg.init_from}: {' '.join(str(e).split())}")
    c = model.config
    shape = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size)
    arch = "GPT-NeoX" if not c.learned_pos else "GPT-Neo" if c.local_layers or not c.scale_attn else "GPT-2"
    print(f"{cfg.init_from}: a pretrained {arch}, "
          f"{shape}, vocab {c.vocab_size}")
    return dict(model=model.state_dict(), model_args=dataclasses.asdict(c), config=shape, kind="lm",
                pretrained=cfg.init_from, tokenizer_sha256=tokenizer_sha256(cfg.init_from))


def tokenizer_sha256(name):
    """The sha256 of the tokenizer.json beside a pretrained model (a local directory, or the hub cache's
    folder that from_pretrained just filled: no request), None where it has none."""
    try:
        path = os.path.join(name if os.path.isdir(name) else hub.model_dir(name), hub.TOKENIZER)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_encoding(base, data, name):
    """Stop if the data's tokens are not the base model's: another vocabulary or another encoding. A hub
    GPT-2 / GPT-Neo of vocab 50257 reads gpt2 tokens; a hub model's own tokenizer.json (kind hf) must be
    the file the model came with (by sha256, where the model's folder has one), its ids below the model's
    vocab (Pythia pads 50277 tokens to 50304 rows); our own checkpoints store their data's encoding."""
    got = data.checkpoint_fields["data"]["meta"].get("encoding", {})
    vocab = base["model_args"]["vocab_size"]
    fits = data.vocab_size <= vocab if got.get("kind") == "hf" else data.vocab_size == vocab
    if base.get("pretrained") and got.get("kind") == "hf":
        want = dict(kind="its tokenizer.json's")
        same = base.get("tokenizer_sha256") in (None, got.get("sha256"))
    elif base.get("pretrained"):
        want = dict(kind="gpt2") if vocab == GPT2_VOCAB else None  # None: vocab only
        same = want is None or got.get("kind") in GPT2_KINDS
    else:
        want = base.get("data", {}).get("meta", {}).get("encoding")
        same = want is None or (got.get("kind"), got.get("words"), got.get("sha256")) == (
            want.get("kind"), want.get("words"), want.get("sha256"))
    if not fits or not same:
        fail(f"--init_from={name} reads {want['kind'] if want else 'its own'} tokens, vocab "
             f"{vocab}; --data_dir={data.checkpoint_fields['data']['data_dir']} has encoding="
             f"{got.get('kind')}, vocab {data.vocab_size} "
             f"(hub models: tinystories_data.py --encoding=gpt2, or --encoding=HUB_ID for the model's own tokenizer)")
