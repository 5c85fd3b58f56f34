"""
The codebook layer: a sparse, discrete top-k bottleneck (Tamkin et al., "Codebook Features").

    from codebook import CodebookLayer
    layer = CodebookLayer(dim=128, num_codes=1024, k=1, groups=4)
    y, ids = layer(x)          # x (..., 128) -> y (..., 128), ids (..., 4, 1) int64

For an activation a, split into G groups of width d = dim // G, each group is
  1. normalised, x = LayerNorm(a) (learnable affine, eps 1e-5; the output stays in this space),
  2. scored against its C codes by cosine similarity, x . c_i / |c_i|,
  3. replaced by the MEAN of its k best codes.
Gradients: straight-through to the input (d y / d x := identity); the codes get the loss gradient
through the output plus the gradient of a reconstruction term, sum over groups of
mean over tokens of |y - sg(x)|^2, added inside the backward as the official 'aeloss' does,
so the model's own loss stays pure cross-entropy. The MSE value is kept in `layer.last_mse`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# the search: a pure function of tensors, the one piece that is compiled


def topk_scores(x, codes, k):
    """x (G, n, d) normalised inputs, codes (G, c, d) unit-norm codes -> top-k (values, ids), (G, n, k)."""
    scores = torch.bmm(x, codes.transpose(1, 2))  # (G, n, c)
    if k == 1:  # max is about twice as fast as topk on CPU
        v, i = scores.max(dim=-1, keepdim=True)
        return v, i
    return scores.topk(k, dim=-1)


def merge_topk(vals, ids, new_vals, new_ids, k):
    """Running top-k over code chunks: keep the k best of two candidate lists, (G, n, k) each."""
    v = torch.cat([vals, new_vals], dim=-1)
    i = torch.cat([ids, new_ids], dim=-1)
    v, order = v.topk(k, dim=-1)
    return v, i.gather(-1, order)


_compiled = {}


def _maybe_compiled(fn, compile):
    if not compile:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


@torch.no_grad()
def search(x, codebook, k, max_elems=1 << 19, compile=False):
    """Ids of the k codes most cosine-similar to each input, slot 0 the best.

    x (N, G, d), codebook (G, C, d) -> ids (N, G, k) int64. Never holds more than about
    `max_elems` scores at once: tokens and, for big codebooks, codes are processed in chunks
    with a running top-k, so memory does not grow with N * C.
    """
    N, G, d = x.shape
    C = codebook.shape[1]
    codes = codebook / codebook.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # dividing by |x| changes no ranking
    xt = x.transpose(0, 1)  # (G, N, d)
    if G * C <= max_elems:  # all codes at once, as many tokens as fit
        n_chunk, c_chunk = max(1, min(N, max_elems // (G * C))), C
    else:  # big codebook: 1024 tokens at a time against chunks of codes
        n_chunk = min(N, 1024)
        c_chunk = max(k, max_elems // (G * n_chunk))
    score_fn = _maybe_compiled(topk_scores, compile)
    merge_fn = _maybe_compiled(merge_topk, compile)
    out = []
    for n0 in range(0, N, n_chunk):
        xc = xt[:, n0:n0 + n_chunk]
        vals, ids = score_fn(xc, codes[:, :c_chunk], k)
        for c0 in range(c_chunk, C, c_chunk):
            v, i = score_fn(xc, codes[:, c0:c0 + c_chunk], min(k, C - c0))
            vals, ids = merge_fn(vals, ids, v, i + c0, k)
        out.append(ids)
    return torch.cat(out, dim=1).transpose(0, 1).contiguous()  # (N, G, k)


# -----------------------------------------------------------------------------
# the straight-through snap with the reconstruction gradient for the codes


class _Snap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xn, codebook, ids, mse_weight):
        G, C, d = codebook.shape
        flat_ids = ids + torch.arange(G, device=ids.device)[:, None] * C  # (N, G, k) into (G*C) rows
        out = F.embedding(flat_ids, codebook.reshape(G * C, d)).mean(dim=-2)  # (N, G, d)
        ctx.save_for_backward(xn, out, flat_ids)
        ctx.mse_weight, ctx.shape = mse_weight, codebook.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xn, out, flat_ids = ctx.saved_tensors
        G, C, d = ctx.shape
        N, _, k = flat_ids.shape
        # d/d out of sum_g mean_n |out - sg(x)|^2, plus the loss gradient; each of the k codes gets 1/k of it
        g = (grad_out + ctx.mse_weight * 2.0 * (out - xn) / N) / k  # (N, G, d)
        grad_codes = torch.zeros(G * C, d, device=g.device, dtype=g.dtype)
        grad_codes.index_add_(0, flat_ids.reshape(-1), g.unsqueeze(2).expand(N, G, k, d).reshape(-1, d))
        return grad_out, grad_codes.view(G, C, d), None, None


# -----------------------------------------------------------------------------
# interventions: plain data passed to forward


@dataclass(frozen=True)
class Intervention:
    """Force or ablate one code of one codebook at inference time.

    force: the code takes the lowest-similarity slot of its group's top-k (a second forced code in
    the same group takes the next slot up, and so on); ablate: the code is removed from the search,
    so the next best is taken. positions index the time axis (dim -2 of the layer's input);
    None means every position, negative values count from the end, values past the end are ignored.
    """
    site: str  # codebook site, e.g. "L2.attn"
    group: int  # head (0 for an ungrouped codebook)
    code: int
    ablate: bool = False
    positions: tuple = None


def _position_mask(positions, T, device):
    if positions is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    mask = torch.zeros(T, dtype=torch.bool, device=device)
    idx = [p % T if p < 0 else p for p in positions if -T <= p < T]
    mask[idx] = True
    return mask


def apply_interventions(ids_ext, interventions, k, T):
    """ids_ext (N, G, k + A) candidates -> (N, G, k) ids after ablations and forced codes."""
    N, G, _ = ids_ext.shape
    dev = ids_ext.device
    ablations = [iv for iv in interventions if iv.ablate]
    forces = [iv for iv in interventions if not iv.ablate]
    if ablations:
        bad = torch.zeros_like(ids_ext, dtype=torch.bool)
        for iv in ablations:
            at = _position_mask(iv.positions, T, dev).repeat(N // T)  # (N,)
            bad[:, iv.group] |= (ids_ext[:, iv.group] == iv.code) & at[:, None]
        order = torch.sort(bad.to(torch.int8), dim=-1, stable=True).indices  # ablated candidates last
        ids_ext = ids_ext.gather(-1, order)
    ids = ids_ext[..., :k].clone()
    slot = [k - 1] * G  # next free slot per group, from the lowest similarity up
    for iv in forces:
        if slot[iv.group] < 0:
            raise ValueError(f"more than k={k} codes forced into group {iv.group} of {iv.site}")
        at = _position_mask(iv.positions, T, dev).repeat(N // T)
        ids[at, iv.group, slot[iv.group]] = iv.code
        slot[iv.group] -= 1
    return ids


# -----------------------------------------------------------------------------
# the layer


class CodebookLayer(nn.Module):
    def __init__(self, dim, num_codes, k=1, groups=1, mse_weight=1.0, compile=False, max_elems=1 << 19):
        super().__init__()
        if dim % groups:
            raise ValueError(f"dim={dim} is not divisible by groups={groups}")
        if not 1 <= k <= num_codes:
            raise ValueError(f"k={k} must be between 1 and num_codes={num_codes}")
        d = dim // groups
        self.dim, self.num_codes, self.k, self.groups = dim, num_codes, k, groups
        self.mse_weight, self.compile, self.max_elems = mse_weight, compile, max_elems
        self.codebook = nn.Parameter(torch.randn(groups, num_codes, d))  # N(0, 1): norm ~ sqrt(d), like LN output
        self.ln_weight = nn.Parameter(torch.ones(groups, d))
        self.ln_bias = nn.Parameter(torch.zeros(groups, d))
        # firings per code, kept on the device: since the last stats read, and since the last dead-code reset
        self.register_buffer("counts", torch.zeros(groups * num_codes))
        self.register_buffer("fired", torch.zeros(groups * num_codes))
        self.register_buffer("mse_sum", torch.zeros(()))
        self.register_buffer("mse_n", torch.zeros(()))
        self.last_mse = None
        self._recent = None  # last normalised training inputs, the pool for dead-code replacement

    def normalize(self, x):
        """(..., dim) -> (N, G, d) in the layer's LayerNorm space."""
        d = self.dim // self.groups
        xg = x.reshape(-1, self.groups, d)
        return F.layer_norm(xg, (d,), eps=1e-5) * self.ln_weight + self.ln_bias

    def forward(self, x, interventions=()):
        if interventions and self.training:
            raise RuntimeError("interventions are for inference only: call model.eval() first")
        xn = self.normalize(x)  # (N, G, d)
        N, G, d = xn.shape
        T = x.shape[-2] if x.dim() >= 3 else N
        n_ablate = max([sum(iv.ablate and iv.group == g for iv in interventions) for g in range(G)], default=0)
        ids = search(xn.detach(), self.codebook.detach(), min(self.k + n_ablate, self.num_codes),
                     self.max_elems, self.compile)
        if interventions:
            ids = apply_interventions(ids, interventions, self.k, T)
        out = _Snap.apply(xn, self.codebook, ids, self.mse_weight)
        with torch.no_grad():
            mse = (out - xn).pow(2).sum(-1).mean(0).sum()
            self.last_mse = mse
            if self.training:
                flat = (ids + torch.arange(G, device=ids.device)[:, None] * self.num_codes).reshape(-1)
                ones = torch.ones_like(flat, dtype=self.counts.dtype)
                self.counts.index_add_(0, flat, ones)
                self.fired.index_add_(0, flat, ones)
                self.mse_sum += mse
                self.mse_n += 1
                self._recent = xn.detach()
        return out.reshape(x.shape), ids.reshape(*x.shape[:-1], G, self.k)

    # --- statistics, read at log time (this is where the host sync happens) ---

    @torch.no_grad()
    def stats(self, reset=True):
        """Usage since the last call: fraction of codes alive, usage entropy (bits, mean over groups), MSE."""
        c = self.counts.view(self.groups, self.num_codes)
        p = c / c.sum(-1, keepdim=True).clamp_min(1)
        entropy = -(p * torch.log2(p.clamp_min(1e-30))).sum(-1).mean()
        out = dict(alive=(c > 0).float().mean().item(), entropy=entropy.item(),
                   mse=(self.mse_sum / self.mse_n.clamp_min(1)).item())
        if reset:
            self.counts.zero_()
            self.mse_sum.zero_()
            self.mse_n.zero_()
        return out

    @torch.no_grad()
    def replace_dead_codes(self, rho=0.01):
        """Reset codes that never fired since the last reset to random recent inputs plus noise.

        The noise is rho * |x| * N(0, I) / sqrt(d), so its norm is about rho * |x|. Returns the count.
        """
        if self._recent is None:
            return 0
        G, C, d = self.codebook.shape
        dead = (self.fired.view(G, C) == 0)
        n_dead = int(dead.sum())
        for g in range(G):
            idx = dead[g].nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            pool = self._recent[:, g]  # (N, d)
            x = pool[torch.randint(len(pool), (len(idx),), device=pool.device)]
            noise = torch.randn_like(x) * x.norm(dim=-1, keepdim=True) / math.sqrt(d)
            self.codebook[g, idx] = x + rho * noise
        self.fired.zero_()
        return n_dead

    @torch.no_grad()
    def kmeans_init(self, x, iters=10, seed=0, match_scale=False):
        """Set the codes to k-means centroids (Euclidean, in LN space) of activations x (..., dim).

        match_scale: first set the LN's affine so that its output has about the scale and offset of x,
        so that inserting the codebook into a trained network changes its activations little.
        """
        if match_scale:
            d = self.dim // self.groups
            xg = x.detach().reshape(-1, self.groups, d).float()  # (N, G, d)
            w = xg.std(-1, unbiased=False).mean(0)[:, None]  # (G, 1): the typical token scale
            self.ln_weight.copy_(w.expand(-1, d))
            self.ln_bias.copy_(xg.mean(0) - w * F.layer_norm(xg, (d,), eps=1e-5).mean(0))  # means match
        xn = self.normalize(x.detach())  # (N, G, d)
        N, G, d = xn.shape
        C = self.num_codes
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for g in range(G):
            pts = xn[:, g]
            pick = torch.randperm(N, generator=gen)[:C] if N >= C else torch.randint(N, (C,), generator=gen)
            cent = pts[pick.to(pts.device)].clone()
            if N < C:  # too few points: jitter the duplicates apart
                cent += 0.01 * torch.randn(cent.shape, generator=gen).to(cent)
            for _ in range(iters):
                assign = torch.cat([(cent.pow(2).sum(-1) - 2 * p @ cent.T).argmin(-1)
                                    for p in pts.split(4096)])  # |x|^2 is the same for every centroid
                sums = torch.zeros_like(cent).index_add_(0, assign, pts)
                n = torch.zeros(C, device=pts.device).index_add_(0, assign, torch.ones_like(assign, dtype=pts.dtype))
                cent = torch.where(n[:, None] > 0, sums / n.clamp_min(1)[:, None], cent)  # empty: keep old
            self.codebook[g] = cent

    def extra_repr(self):
        return f"dim={self.dim}, num_codes={self.num_codes}, k={self.k}, groups={self.groups}"
