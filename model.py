"""
A nanoGPT-style transformer whose blocks carry codebook sites.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=11, block_size=128, cb_at="attn+mlp", num_codes=1024, k=1))
    logits, loss, codes, mse = model(idx, targets)
    # codes["L2.attn"]: (B, T, n_head, k) ids; codes["L2.mlp"]: (B, T, 1, k)
    out = model.generate(idx, max_new_tokens=32)   # with a KV cache; use_cache=False reruns the context

Sites, per block:
  L{i}.attn: the per-head attention outputs (att @ v, merged head-major), before c_proj; one group per head.
  L{i}.mlp:  the MLP output, before the residual add.
The residual stream itself is never quantised. A code is addressed as "L2.attn.h3:417" (layer 2,
attention, head 3, code 417) or "L2.mlp:88"; parse_code() is the one parser for that format.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from codebook import CodebookLayer, Intervention

CB_AT = ("none", "attn", "mlp", "attn+mlp")


@dataclass
class GPTConfig:
    block_size: int = 128  # longest context
    vocab_size: int = 11
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = True  # bias in Linears and LayerNorms, as GPT-2
    rope: bool = True  # rotary embeddings on q, k (as GPT-NeoX, the paper's model) besides learned positions
    cb_at: str = "attn+mlp"  # which sites carry codebooks: none, attn, mlp, attn+mlp
    num_codes: int = 1024  # codes per codebook (per head for attention)
    k: int = 1  # codes per token per group
    cb_layers: tuple = None  # layers that carry codebooks; None = all
    mlp_groups: int = 1  # groups of the MLP codebook
    compile: bool = False  # torch.compile the codebook search
    # what pretrained GPT-2 / GPT-Neo / GPT-NeoX models need (pretrained/load.py); the defaults are this project's
    qkv_bias: bool = True  # bias in c_attn (when bias): GPT-Neo's q, k, v projections have none
    scale_attn: bool = True  # q . k / sqrt(head size); GPT-Neo does not scale
    attn_fp32: bool = False  # attention scores in fp32 under autocast, as GPT-Neo
    local_window: int = 0  # the layers in local_layers attend to the last local_window positions only
    local_layers: tuple = ()  # (GPT-Neo alternates global and local layers, window 256, the token included)
    gelu: str = "exact"  # the MLP's GELU: exact (erf) or tanh (GPT-2's and GPT-Neo's gelu_new)
    ln_eps: float = 1e-5  # LayerNorm epsilon
    learned_pos: bool = True  # a learned position embedding (wpe); GPT-NeoX has none, only rotary
    rope_pct: float = 1.0  # the fraction of each head's dims that rotary turns, the first ones (Pythia: 0.25)
    rope_base: float = 10000.0  # rotary's base (GPT-NeoX's rotary_emb_base)
    parallel: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)), GPT-NeoX's parallel residual; else one after the other
    tie_head: bool = True  # lm_head shares wte's weight, as GPT-2; GPT-NeoX's output head is its own


# -----------------------------------------------------------------------------
# code addresses


_CODE_RE = re.compile(r"^L(\d+)\.(attn|mlp)(?:\.h(\d+))?:(\d+)$")


def parse_code(s):
    """'L2.attn.h3:417' -> ('L2.attn', 3, 417); 'L2.mlp:88' -> ('L2.mlp', 0, 88)."""
    m = _CODE_RE.match(s.strip())
    if not m:
        raise ValueError(f"bad code address {s!r}: expected like 'L2.attn.h3:417' or 'L2.mlp:88'")
    layer, kind, head, code = m.groups()
    return f"L{layer}.{kind}", int(head or 0), int(code)


def format_code(site, group, code):
    """The inverse of parse_code."""
    return f"{site}.h{group}:{code}" if site.endswith("attn") else f"{site}:{code}"


# -----------------------------------------------------------------------------
# the transformer


def rotate(x, pos0=0, base=10000.0):
    """Rotary position embedding of queries or keys x (B, T, n, hs) at positions pos0 .. pos0 + T - 1: the
    pairs (x_i, x_{i+hs/2}) turn by an angle proportional to the position, so q . k depends on the relative
    offset. A previous-token head, which TokFSM needs, is then easy to learn; with learned absolute
    positions alone it plateaus long."""
    T, hs = x.shape[1], x.shape[-1]
    freq = base ** (-torch.arange(0, hs // 2, device=x.device, dtype=torch.float32) / (hs // 2))
    angle = torch.arange(pos0, pos0 + T, device=x.device, dtype=torch.float32)[:, None] * freq  # (T, hs/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), as x * (cos, cos) + (x2, x1) * (-sin, sin)
    return _Rotation.apply(x, torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None])


def _rotation(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., h:], x[..., :h]], -1) * sin


class _Rotation(torch.autograd.Function):
    """x -> _rotation(x, cos, sin), whose backward is the turn back (by -angle): one pass each way, where
    autograd's backward of the slices, products and concatenation takes several times the forward."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotation(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotation(grad, cos, -sin), None, None


class KVCache:
    """The keys and values of the tokens seen so far, for generation: kv["L2.attn"] = (k, v), each
    (B, nh, T, hs), rotary already applied. T is the number of tokens cached, the position of the next one."""

    def __init__(self):
        self.kv = {}

    @property
    def T(self):
        return next(iter(self.kv.values()))[0].size(2) if self.kv else 0

    def update(self, name, k, v):
        """Append the new tokens' k, v (B, nh, T_new, hs) -> the keys and values of all tokens so far."""
        if name in self.kv:
            k, v = (torch.cat((old, new), dim=2) for old, new in zip(self.kv[name], (k, v)))
        self.kv[name] = (k, v)
        return k, v


def attn_mask(T, pos0, window, device):
    """(T, pos0 + T) bool: query i (at position pos0 + i) sees key j if j <= pos0 + i and, with a window,
    pos0 + i - j < window (the last `window` positions, its own included). None: plain causal, pos0 = 0."""
    if pos0 == 0 and not window:
        return None
    q = torch.arange(pos0, pos0 + T, device=device)[:, None]
    j = torch.arange(pos0 + T, device=device)[None, :]
    return (j <= q) & (q - j < window) if window else j <= q


class CausalSelfAttention(nn.Module):
    def __init__(self, config, codebook, layer=0):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.rope = config.rope
        self.rope_dims = int(config.n_embd // config.n_head * config.rope_pct)  # the first rope_dims of a head turn
        self.rope_base = config.rope_base
        self.scale = None if config.scale_attn else 1.0  # None: SDPA's 1 / sqrt(head size)
        self.fp32 = config.attn_fp32
        self.window = config.local_window if layer in config.local_layers else 0  # 0: global
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias and config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.codebook = codebook  # groups = n_head: one codebook per head

    def forward(self, x, interventions=(), activations=None, name="", pos0=0, kv_cache=None):
        """x (B, T, C) at positions pos0 .. pos0 + T - 1; kv_cache: a KVCache holding the pos0 tokens before
        them, which this call extends with theirs."""
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        if self.rope:  # q and k turned together, in one op
            qk, r = qkv[:, :, :2].flatten(2, 3), self.rope_dims  # (B, T, 2 nh, hs)
            if r == qk.size(-1):
                qk = rotate(qk, pos0, self.rope_base)
            else:  # GPT-NeoX turns the first r dims of each head only; the rest carry no position
                qk = torch.cat([rotate(qk[..., :r], pos0, self.rope_base), qk[..., r:]], -1)
            q, k = qk.unflatten(2, (2, self.n_head)).unbind(2)
            v = qkv[:, :, 2]
        else:
            q, k, v = qkv.unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(name, k, v)  # (B, nh, pos0 + T, hs)
        # with a KV cache, the new tokens see the cached ones: the causal mask's diagonal shifts right by pos0
        mask = attn_mask(T, pos0, self.window, x.device)
        if self.fp32:  # GPT-Neo's unscaled scores, kept in fp32 (its weights were trained so)
            with torch.autocast(x.device.type, enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                   is_causal=mask is None, scale=self.scale).to(v.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # head-major: head h is y[..., h*hs:(h+1)*hs]
        if activations is not None:
            activations[name + ".in"] = y
        ids = None
        if self.codebook is not None:
            y, ids = self.codebook(y, interventions, pos0)
        return self.c_proj(y), ids


class MLP(nn.Module):
    def __init__(self, config, codebook):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"
        self.codebook = codebook

    def forward(self, x, interventions=(), activations=None, name="", pos0=0, kv_cache=None):
        """As CausalSelfAttention's; kv_cache is unused: an MLP looks at one position only."""
        h = F.gelu(self.c_fc(x), approximate=self.approximate)
        y = self.c_proj(h)
        if activations is not None:
            activations[name + ".hidden"] = h
            activations[name + ".in"] = y
        ids = None
        if self.codebook is not None:
            y, ids = self.codebook(y, interventions, pos0)
        return y, ids


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        on = config.cb_layers is None or layer in config.cb_layers

        def codebook(groups):
            return CodebookLayer(config.n_embd, config.num_codes, config.k, groups, compile=config.compile)

        self.layer = layer
        self.parallel = config.parallel
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, codebook(config.n_head) if on and "attn" in config.cb_at else None,
                                        layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.mlp = MLP(config, codebook(config.mlp_groups) if on and "mlp" in config.cb_at else None)

    def forward(self, x, interventions, codes, activations, pos0=0, kv_cache=None):
        x0 = x  # the block's input: with the parallel residual (GPT-NeoX) the MLP reads it too, not x + attn
        for kind, module, ln in (("attn", self.attn, self.ln_1), ("mlp", self.mlp, self.ln_2)):
            name = f"L{self.layer}.{kind}"
            here = [iv for iv in interventions if iv.site == name]
            y, ids = module(ln(x0 if self.parallel else x), here, activations, name, pos0, kv_cache)
            if ids is not None:
                codes[name] = ids
            x = x + y
        if activations is not None:
            activations[f"L{self.layer}.resid"] = x
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.cb_at not in CB_AT:
            raise ValueError(f"cb_at={config.cb_at!r} is not one of {', '.join(CB_AT)}")
        if config.gelu not in ("exact", "tanh"):
            raise ValueError(f"gelu={config.gelu!r} is not one of exact, tanh")
        rope_dims = int(config.n_embd // config.n_head * config.rope_pct)
        if config.rope and (rope_dims < 2 or rope_dims % 2):
            raise ValueError(f"rope_pct={config.rope_pct} turns {rope_dims} dims of a head of "
                             f"{config.n_embd // config.n_head}; rotary needs an even number, at least 2")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.learned_pos else None,  # NeoX: rotary only
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):  # scaled init of the residual projections, as GPT-2
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def codebooks(self):
        """{site name: CodebookLayer} in network order."""
        out = {}
        for block in self.transformer.h:
            for kind in ("attn", "mlp"):
                cb = getattr(block, kind).codebook
                if cb is not None:
                    out[f"L{block.layer}.{kind}"] = cb
        return out

    def codebook_stats(self):
        """{site: {alive, entropy_bits, mse}} since the last call (CodebookLayer.stats), plus 'all'."""
        stats = {name: cb.stats() for name, cb in self.codebooks().items()}
        if stats:
            sizes = {name: cb.groups * cb.num_codes for name, cb in self.codebooks().items()}
            stats["all"] = dict(alive=sum(s["alive"] * sizes[n] for n, s in stats.items()) / sum(sizes.values()),
                                mse=sum(s["mse"] for s in stats.values()))
        return stats

    @torch.no_grad()
    def init_codebooks(self, idx, iters=10, match_scale=True):
        """k-means-initialise every codebook from this model's own activations on idx (B, T), site by
        site in network order, so that each site sees the inputs it will get with the earlier codebooks
        already in place. Used to insert codebooks into a trained network (the paper's finetuning)."""
        was_training = self.training
        self.eval()
        for name, cb in self.codebooks().items():
            activations = {}
            self(idx, activations=activations)
            cb.kmeans_init(activations[name + ".in"], iters=iters, match_scale=match_scale)
        self.train(was_training)

    def check_intervention(self, iv):
        """Raise ValueError if an Intervention does not fit this model."""
        cbs = self.codebooks()
        if iv.site not in cbs:
            raise ValueError(f"no codebook at {iv.site}: this model has {', '.join(cbs) or 'none'}")
        cb = cbs[iv.site]
        if not 0 <= iv.group < cb.groups:
            raise ValueError(f"head {iv.group} out of range for {iv.site}: it has {cb.groups} group(s)")
        if not 0 <= iv.code < cb.num_codes:
            raise ValueError(f"code {iv.code} out of range for {iv.site}: valid 0..{cb.num_codes - 1}")

    def forward(self, idx, targets=None, interventions=(), activations=None, kv_cache=None):
        """idx (B, T) -> logits (B, T, V), loss (CE, or None), codes {site: (B, T, G, k)}, mse (summed).

        interventions: a list of codebook.Intervention (inference only). activations: pass a dict to get the
        activations before each codebook ("L1.mlp.in"), the MLP hidden units ("L1.mlp.hidden") and the
        residual stream after each block ("L1.resid"). kv_cache: a KVCache of the tokens before idx (which
        then sit at positions kv_cache.T onwards: outputs and Intervention positions are absolute), extended
        with idx's own; generate's way of running only the new token.
        """
        B, T = idx.size()
        pos0 = kv_cache.T if kv_cache is not None else 0  # the position of idx's first token
        if pos0 + T > self.config.block_size:
            raise ValueError(f"sequence of length {pos0 + T} is longer than block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        if self.config.learned_pos:  # absolute positions: TokFSM needs parity
            x = x + self.transformer.wpe(torch.arange(pos0, pos0 + T, dtype=torch.long, device=idx.device))
        codes = {}
        for block in self.transformer.h:
            x = block(x, interventions, codes, activations, pos0, kv_cache)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        mses = [cb.last_mse for cb in self.codebooks().values()]
        mse = torch.stack(mses).sum() if mses else None
        return logits, loss, codes, mse

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, interventions=(), generator=None,
                 use_cache=True):
        """Sample max_new_tokens after idx (B, T). Positions are absolute (0 = first prompt token), so "the
        generated tokens" is positions range(T, T + max_new_tokens).

        use_cache: keep every layer's keys and values (KVCache): the prompt runs in one forward, then each
        step runs the new token only. Every codebook site is causal (a position's codes depend on its prefix
        only), so this samples the same tokens as rerunning the whole context at each step (use_cache=False,
        the reference), with the same draws from generator, interventions at every position (positions=None)
        or at fixed ones included. A negative position counts from the end of the context, which moves on at
        each step: a rerun puts it on another token each time, while a cached token's codes are fixed once
        computed. With any negative position generate therefore falls back to the full rerun."""
        if idx.size(1) + max_new_tokens - 1 > self.config.block_size:
            raise ValueError(f"{idx.size(1)} prompt + {max_new_tokens} new tokens exceed block_size "
                             f"{self.config.block_size}")
        if any(p < 0 for iv in interventions for p in (iv.positions or ())):
            use_cache = False
        kv_cache = KVCache() if use_cache else None
        x = idx  # what the next forward runs: everything, or with the KV cache the tokens not yet seen
        for _ in range(max_new_tokens):
            logits, _, _, _ = self(x, interventions=interventions, kv_cache=kv_cache)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
            x = idx_next if use_cache else idx
        return idx


def make_interventions(addresses, ablate=False, positions=None):
    """['L2.attn.h3:417', ...] -> [Intervention, ...]."""
    out = []
    for a in addresses:
        site, group, code = parse_code(a)
        out.append(Intervention(site, group, code, ablate, None if positions is None else tuple(positions)))
    return out


def model_from_checkpoint(ckpt, device="cpu"):
    """Rebuild the model stored in a checkpoint dict (common.load_checkpoint: torch.load(weights_only=True))."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device)
