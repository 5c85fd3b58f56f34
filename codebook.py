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

This file is the method, and imports only torch: the plain search below, the layer, interventions (force
or ablate a code at inference). The scripts then call `tuned.use_tuned_search(model)`, as nanoGPT calls
torch.compile: it swaps in the tuned search of tuned/tiled.py (per-device tiles, block maxima, fused Triton
kernels on a GPU), which finds the same ids (tested), and a LayerNorm whose backward keeps less.
"""

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# the search: a pure function of tensors


def similarity(x, codes):
    """Cosine scores up to a per-token factor: x (n, G, d), unit codes (G, C, d) -> (n, G, C).
    Dividing by |x| changes no token's ranking, so it is left out. Another similarity goes here (and
    then leave out use_tuned_search: the tuned search is cosine only)."""
    return torch.einsum("ngd,gcd->ngc", x, codes)


def top_codes(x, codes, k):
    """(n, G, d) -> (n, G, k) ids of the k best codes, best first. compile=True compiles this."""
    return similarity(x, codes).topk(k, dim=-1).indices


@contextmanager
def exact_fp32():
    """Matmuls in fp32 inside. torch.set_float32_matmul_precision("high"), or
    torch.backends.cuda.matmul.allow_tf32 = True as nanoGPT's train.py sets, makes them TF32, which rounds
    the inputs to 10 mantissa bits: ids would stop matching an fp32 search, and the fused search's proof
    assumes fp32 re-scores. The user's setting is restored on exit."""
    try:
        legacy = torch.get_float32_matmul_precision()  # allow_tf32 = True reads as "high"
    except RuntimeError:  # set through torch >= 2.9's per-backend API, which the legacy getter refuses
        legacy = None
    backends = [b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
                if hasattr(b, "fp32_precision")]  # torch >= 2.9
    old = [b.fp32_precision for b in backends]
    by_legacy = legacy not in (None, "highest")
    if not by_legacy and all(o in ("none", "ieee") for o in old):
        yield
        return
    if by_legacy:  # the same API as the user's, or torch would see them mixed and refuse to read either
        torch.set_float32_matmul_precision("highest")
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        if by_legacy:
            torch.set_float32_matmul_precision(legacy)
        for b, o in zip(backends, old):
            if b.fp32_precision != o:
                b.fp32_precision = o


@functools.cache
def compiled_top_codes():
    return torch.compile(top_codes)  # on first use: at import it would cost every script a second or two


@torch.no_grad()
def search(x, codebook, k, max_elems=None, compile=False):
    """Ids of the k codes most cosine-similar to each input, slot 0 the best: x (N, G, d),
    codebook (G, C, d) -> (N, G, k) int64. Tokens go in chunks of about max_elems scores (None: 2^22),
    so memory does not grow with N. Matmuls are pinned to fp32: TF32 would round the scores and change ids."""
    (N, G, _), C = x.shape, codebook.shape[1]
    if not 1 <= k <= C:
        raise ValueError(f"search: k = {k}; valid: 1 <= k <= {C}, the number of codes")
    select = compiled_top_codes() if compile else top_codes
    codes = F.normalize(codebook, dim=-1)  # (G, C, d) unit codes: x . c_i / |c_i|
    ids = torch.empty(N, G, k, dtype=torch.long, device=x.device)
    n = max(1, (max_elems or 1 << 22) // (G * C))  # tokens a chunk
    with exact_fp32():
        for i in range(0, N, n):
            ids[i:i + n] = select(x[i:i + n], codes, k)
    return ids


def layer_norm(x, weight, bias):
    """x (N, G, d) -> LayerNorm over d (eps 1e-5), then each group's affine, weight and bias (G, d)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-5) * weight + bias


def flat_code_ids(ids, num_codes):
    """ids (..., G, k) -> the same codes numbered across the groups, group g's code c as g * num_codes + c:
    rows of the (G * C, d) table of all codes, and one bincount counts every code of every group."""
    return ids + torch.arange(ids.shape[-2], device=ids.device)[:, None] * num_codes


def usage(counts):
    """(G, C) firings of each code -> the fraction of codes alive (fired at least once) and the entropy of
    the codes' usage (bits, mean over groups; log2 C when every code fires equally often)."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(torch.xlogy(p, p) / math.log(2)).sum(-1).mean()
    return dict(alive=(counts > 0).double().mean().item(), entropy_bits=entropy.item())


# -----------------------------------------------------------------------------
# the straight-through snap, with the reconstruction gradient for the codes


class _SnapToCodes(torch.autograd.Function):
    """(xn (N, G, d), codebook, ids (N, G, k)) -> out, the mean of the k chosen codes, and the logged mse,
    sum over groups of mean over tokens of |out - xn|^2. No (N, G, k, d) tensor, forward or backward.
    rows: (token, group) rows per step of the codes' gradient scatter (None: all at once)."""

    @staticmethod
    def forward(ctx, xn, codebook, ids, mse_weight, rows=None):
        G, C, d = codebook.shape
        N, _, k = ids.shape
        flat_ids = flat_code_ids(ids, C).reshape(N * G, k)  # rows of the (G*C, d) table
        table = codebook.reshape(G * C, d)
        if k == 1:  # the same values; a row gather is several times faster than a bag of one
            out = table.index_select(0, flat_ids[:, 0]).view(N, G, d)
        else:
            out = F.embedding_bag(flat_ids, table, mode="mean").view(N, G, d)
        diff = (out - xn).view(-1)
        ctx.save_for_backward(xn, out, flat_ids)  # alive anyway (the caller holds both): no extra memory
        ctx.mse_weight, ctx.shape, ctx.rows = mse_weight, codebook.shape, rows or N * G
        mse = torch.dot(diff, diff) / N
        ctx.mark_non_differentiable(mse)
        return out, mse

    @staticmethod
    def backward(ctx, grad_out, _):
        xn, out, flat_ids = ctx.saved_tensors
        (G, C, d), (N, k) = ctx.shape, (xn.shape[0], flat_ids.shape[1])
        grad_codes = None
        if ctx.needs_input_grad[1]:
            grad_codes = torch.zeros(G * C, d, device=xn.device, dtype=xn.dtype)
            xn, out, grad = (t.reshape(N * G, d) for t in (xn, out, grad_out))
            for r in range(0, N * G, ctx.rows):
                # d/d out of sum_g mean_n |out - sg(x)|^2 plus the loss gradient; each of the k codes gets 1/k
                g = torch.sub(out[r:r + ctx.rows], xn[r:r + ctx.rows]).mul_(ctx.mse_weight * 2.0 / N)
                g = g.add_(grad[r:r + ctx.rows])
                if k > 1:
                    g = g.div_(k)
                for j in range(k):
                    grad_codes.index_add_(0, flat_ids[r:r + ctx.rows, j], g)
            grad_codes = grad_codes.view(G, C, d)
        return grad_out, grad_codes, None, None, None  # straight-through to the input


# -----------------------------------------------------------------------------
# the layer


class CodebookLayer(nn.Module):
    """y, ids = layer(x, interventions=(), pos0=0): x (..., dim) -> y (..., dim), ids (..., groups, k).

    num_codes C per group, k codes per token; mse_weight scales the codes' reconstruction gradient;
    compile: torch.compile the search; max_elems: scores held at once by the search (None: its default).
    Three plain-function attributes say how it computes, and tuned.use_tuned_search swaps them: search
    (this file's), layer_norm (F.layer_norm with the groups' affine), scatter_rows (None, or device -> rows
    per step of the codes' gradient scatter). Each choice gives the same ids and gradients (tested).
    pos0: the position of x's first token (dim -2), for interventions at absolute positions: a generation
    step with a KV cache passes only the new tokens."""

    def __init__(self, dim, num_codes, k=1, groups=1, mse_weight=1.0, compile=False, max_elems=None):
        super().__init__()
        if dim % groups:
            raise ValueError(f"dim={dim} is not divisible by groups={groups}")
        if not 1 <= k <= num_codes:
            raise ValueError(f"k={k} must be between 1 and num_codes={num_codes}")
        d = dim // groups
        self.dim, self.num_codes, self.k, self.groups = dim, num_codes, k, groups
        self.mse_weight, self.compile, self.max_elems = mse_weight, compile, max_elems
        self.search, self.layer_norm, self.scatter_rows = search, layer_norm, None  # plain functions: see above
        self.codebook = nn.Parameter(torch.randn(groups, num_codes, d))  # N(0, 1): norm ~ sqrt(d), like LN output
        self.ln_weight = nn.Parameter(torch.ones(groups, d))
        self.ln_bias = nn.Parameter(torch.zeros(groups, d))
        # firings per code (flat_code_ids), kept on the device: since the last stats read, since the last reset
        self.register_buffer("uses_since_read", torch.zeros(groups * num_codes))
        self.register_buffer("uses_since_reset", torch.zeros(groups * num_codes))
        self.register_buffer("mse_sum", torch.zeros(()))
        self.register_buffer("mse_n", torch.zeros(()))
        self.last_mse = None
        self._recent = None  # last normalised training inputs, the pool for dead-code replacement

    def normalize(self, x):
        """(..., dim) -> (N, G, d) in the layer's LayerNorm space: each group its own LN affine."""
        return self.layer_norm(x.reshape(-1, self.groups, self.dim // self.groups), self.ln_weight, self.ln_bias)

    def forward(self, x, interventions=(), pos0=0):
        if interventions and self.training:
            raise RuntimeError("interventions are for inference only: call model.eval() first")
        with torch.autocast(x.device.type, enabled=False):  # under bf16 autocast the layer stays fp32:
            return self._forward(x, interventions, pos0)  # a bf16 search would pick other codes than fp32's

    def _forward(self, x, interventions, pos0=0):
        xn = self.normalize(x.float())  # (N, G, d)
        N, G, d = xn.shape
        T = x.shape[-2] if x.dim() >= 3 else N
        n_ablate = max([sum(iv.ablate and iv.group == g for iv in interventions) for g in range(G)], default=0)
        k = min(self.k + n_ablate, self.num_codes)  # ablated codes leave the search: more candidates
        ids = self.search(xn.detach(), self.codebook.detach(), k, self.max_elems, self.compile)
        rows = self.scatter_rows(x.device) if self.scatter_rows else None
        if interventions:
            ids = apply_interventions(ids, interventions, self.k, T, pos0)
        out, mse = _SnapToCodes.apply(xn, self.codebook, ids, self.mse_weight, rows)
        with torch.no_grad():
            self.last_mse = mse
            if self.training:
                flat = flat_code_ids(ids, self.num_codes).reshape(-1)
                ones = torch.ones_like(flat, dtype=self.uses_since_read.dtype)
                self.uses_since_read.index_add_(0, flat, ones)
                self.uses_since_reset.index_add_(0, flat, ones)
                self.mse_sum += mse
                self.mse_n += 1
                self._recent = xn.detach()
        return out.reshape(x.shape), ids.reshape(*x.shape[:-1], G, self.k)

    # --- statistics, read at log time (this is where the host sync happens) ---

    @torch.no_grad()
    def stats(self, reset=True):
        """usage() since the last call (alive, entropy_bits) and the mean reconstruction MSE."""
        out = dict(**usage(self.uses_since_read.view(self.groups, self.num_codes)),
                   mse=(self.mse_sum / self.mse_n.clamp_min(1)).item())
        if reset:
            self.uses_since_read.zero_()
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
        dead = (self.uses_since_reset.view(G, C) == 0)
        n_dead = int(dead.sum())
        for g in range(G):
            idx = dead[g].nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            pool = self._recent[:, g]  # (N, d)
            x = pool[torch.randint(len(pool), (len(idx),), device=pool.device)]
            noise = torch.randn_like(x) * x.norm(dim=-1, keepdim=True) / math.sqrt(d)
            self.codebook[g, idx] = x + rho * noise
        self.uses_since_reset.zero_()
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

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        for old, new in (("counts", "uses_since_read"), ("fired", "uses_since_reset")):  # older checkpoints' names
            if prefix + old in state:
                state[prefix + new] = state.pop(prefix + old)
        super()._load_from_state_dict(state, prefix, *args, **kwargs)

    def extra_repr(self):
        return f"dim={self.dim}, num_codes={self.num_codes}, k={self.k}, groups={self.groups}"


# -----------------------------------------------------------------------------
# interventions: plain data passed to forward


@dataclass(frozen=True)
class Intervention:
    """Force or ablate one code of one codebook at inference time.

    force: the code takes the lowest-similarity slot of its group's top-k (a second forced code in
    the same group takes the next slot up, and so on); ablate: the code is removed from the search,
    so the next best is taken. positions index the time axis (dim -2 of the layer's input), absolute
    (the input starts at position pos0, 0 unless a KV cache holds the tokens before it); None means every
    position, negative values count from the end of the input, values outside the input are ignored.
    """
    site: str  # codebook site, e.g. "L2.attn"
    group: int  # head (0 for an ungrouped codebook)
    code: int
    ablate: bool = False
    positions: tuple = None


def _position_mask(positions, T, device, pos0=0):
    """(T,) bool: which of the input's T positions, pos0 .. pos0 + T - 1, are in positions."""
    if positions is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    mask = torch.zeros(T, dtype=torch.bool, device=device)
    idx = [T + p if p < 0 else p - pos0 for p in positions]  # indices into the input
    mask[[i for i in idx if 0 <= i < T]] = True
    return mask


def apply_interventions(candidates, interventions, k, T, pos0=0):
    """candidates (N, G, k + A), the search's k + A best ids, best first (A: the most codes ablated in a
    group) -> (N, G, k) ids after ablations and forced codes; the N rows are (B, T) tokens at positions
    pos0 .. pos0 + T - 1."""
    N, G, _ = candidates.shape
    dev = candidates.device
    ablations = [iv for iv in interventions if iv.ablate]
    forces = [iv for iv in interventions if not iv.ablate]
    if ablations:
        bad = torch.zeros_like(candidates, dtype=torch.bool)
        for iv in ablations:
            at = _position_mask(iv.positions, T, dev, pos0).repeat(N // T)  # (N,)
            bad[:, iv.group] |= (candidates[:, iv.group] == iv.code) & at[:, None]
        order = torch.sort(bad.to(torch.int8), dim=-1, stable=True).indices  # ablated candidates last
        candidates = candidates.gather(-1, order)
    ids = candidates[..., :k].clone()
    slot = [k - 1] * G  # next free slot per group, from the lowest similarity up
    for iv in forces:
        if slot[iv.group] < 0:
            raise ValueError(f"more than k={k} codes forced into group {iv.group} of {iv.site}")
        at = _position_mask(iv.positions, T, dev, pos0).repeat(N // T)
        ids[at, iv.group, slot[iv.group]] = iv.code
        slot[iv.group] -= 1
    return ids
