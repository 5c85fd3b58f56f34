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

import triton_search

# -----------------------------------------------------------------------------
# the search: pure functions of tensors; compile=True compiles the top-k of a tile
#
# The work is one (N, d) @ (d, C) score matmul per group. What makes it slow is everything around it, and
# that differs per device. On a CPU a full (N, C) score matrix does not fit in cache, and torch.topk costs
# ~2 ns a score, more than the matmul: so scores are made a tile (~2 MB a thread) at a time into one
# reused buffer, and a tile's top-k is found through strided blocks (the k best codes lie in the k blocks
# with the best maxima, so one vectorised max pass touches every score and topk sees 1/16 of them, plus
# 16k candidates). On a GPU each op is a kernel launch: cache-sized tiles meant thousands of tiny
# kernels (the layer ran 9-27x slower than the official code on an H100), so a GPU gets tiles of tens
# of millions of scores.

# The per-device choices, in one place (measured with bench.py; README "Speed"):
#   tile_elems  scores held at once (on CPU per thread); on CUDA also at most 1/8 of the free memory.
#               On an H200 each halving of a 2^26 tile cost 5-10% (k = 1) to 25-40% (k = 8, C = 100k):
#               every tile is ~10 small kernels after its matmul, so launches add up
#   block_k1    block size of the top-1 pass (1: a plain max over the codes, one read of the scores;
#               on the H200 the block maxima were 8% slower than a plain max)
#   block       block size of the top-k pass, k > 1 (on the H200 a plain topk was 1.7-1.9x slower)
#   bwd_rows    rows of (tokens x groups) per step of the codes' gradient scatter
#   compile     whether compile=True compiles a tile's top-k here: on the H200 it gained nothing at
#               k = 1, 7% at the LM shape and lost 25% at 100k codes, so a GPU runs it eagerly
#   fused       None: the torch tiles above; or the tensor-core precision of triton_search's fused
#               kernels ("tf32x3", "tf32", "ieee"), which never write the scores (CUDA with Triton only).
#               Off until timed on a GPU: bench.py --fused=tf32x3 measures it
#   fused_tile  (tokens, codes, warps) of a program of the fused candidate kernels; their k > 1 pass
#               takes the maxima of `block` consecutive codes
PLANS = {
    "cpu": dict(tile_elems=1 << 19, block_k1=16, block=16, bwd_rows=8192, compile=True, fused=None,
                fused_tile=None),
    "cuda": dict(tile_elems=1 << 26, block_k1=1, block=16, bwd_rows=1 << 16, compile=False, fused=None,
                 fused_tile=(64, 64, 4)),
}


def device_plan(kind, threads=1, free_bytes=None):
    """The PLANS entry for a device kind ('cpu', 'cuda'; others, e.g. mps, take the GPU plan), its
    tile_elems scaled for the machine: per thread on a CPU, at most 1/8 of free_bytes on a GPU."""
    p = dict(PLANS["cpu" if kind == "cpu" else "cuda"])
    if kind == "cpu":
        p["tile_elems"] *= threads  # a tile per core's cache, and rows enough that topk runs on all cores
    elif free_bytes is not None:
        p["tile_elems"] = max(1 << 20, min(p["tile_elems"], free_bytes // 8 // 4))  # fp32 scores
    return p


_free = {}


def plan_for(device):
    """device_plan for a torch.device, with this process's threads or the GPU's free memory (read once
    per device: a driver call, not a per-forward cost)."""
    if device.type != "cuda":
        return device_plan(device.type, torch.get_num_threads())
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _free:
        _free[i] = torch.cuda.mem_get_info(i)[0]
    return device_plan("cuda", free_bytes=_free[i])


def topk_scores(s, k, valid, block):
    """Top-k of a tile of scores s (G, n, c) -> (values, ids), (G, n, k), best first. Codes from `valid`
    on are padding up to a multiple of `block` (their scores are overwritten with -inf)."""
    G, n, c = s.shape
    if valid < c:
        s[..., valid:] = float("-inf")
    m = c // block
    if block == 1 or m < k:
        return s.max(dim=-1, keepdim=True) if k == 1 else s.topk(k, dim=-1)  # max: 2x faster than topk
    blocks = s.view(G, n, block, m)  # blocks[..., r, j] is code r * m + j: block j holds codes j, m + j, ...
    best = blocks.amax(dim=2)  # (G, n, m) block maxima: an elementwise max of `block` contiguous rows
    if k == 1:
        v, j = best.max(dim=-1, keepdim=True)  # (G, n, 1)
        r = blocks.gather(3, j.unsqueeze(2).expand(G, n, block, 1)).view(G, n, block).argmax(-1, keepdim=True)
        return v, j.add_(r, alpha=m)
    J = best.topk(k, dim=-1).indices  # (G, n, k) the blocks that hold the k best codes
    v, p = blocks.gather(3, J.unsqueeze(2).expand(G, n, block, k)).view(G, n, block * k).topk(k, dim=-1)
    return v, torch.div(p, k, rounding_mode="floor") * m + J.gather(-1, p % k)


def merge_topk(vals, ids, new_vals, new_ids, k):
    """Running top-k over code chunks: keep the k best of two candidate lists, (G, n, k) each."""
    if k == 1:
        take = new_vals > vals  # a tie keeps the earlier chunk's (lower) id
        return torch.where(take, new_vals, vals), torch.where(take, new_ids, ids)
    v, order = torch.cat([vals, new_vals], dim=-1).topk(k, dim=-1)
    return v, torch.cat([ids, new_ids], dim=-1).gather(-1, order)


_compiled = {}


def _maybe_compiled(fn, compile):
    if not compile:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)  # dynamic=None: a second tile shape recompiles once, with symbolic sizes
    return _compiled[fn]


def plan(N, G, C, k, max_elems=1 << 19, block=16):
    """Tile sizes (groups, tokens, codes) and block size: about max_elems scores a tile, at least 32
    tokens a matmul, and as few code chunks as possible (each adds a merge and topk's per-row cost);
    tokens before groups (each group's codes are packed anew for the matmul). block: the device's block
    size for this k (device_plan), used where a row has >= 64 blocks."""
    c = max(k, -(-C // -(-C * 32 // max_elems)))  # C split evenly into chunks of <= max_elems / 32 codes
    block = block if c >= max(1024, 64 * k) else 1  # >= 64 blocks a row, or the block maxima are not worth it
    c = -(-c // block) * block  # whole blocks (the last chunk is padded)
    n = max(1, min(N, max_elems // c))
    return max(1, min(G, max_elems // (n * c))), n, c, block


@torch.no_grad()
def search(x, codebook, k, max_elems=None, compile=False, kind=None):
    """Ids of the k codes most cosine-similar to each input, slot 0 the best.

    x (N, G, d), codebook (G, C, d) -> ids (N, G, k) int64, the same as a brute-force topk over all
    scores (up to exact ties). The device's plan picks the way: triton_search's fused kernels where
    it names a precision, Triton runs and d <= triton_search.MAX_WIDTH, else tiled_search.
    kind: follow another device kind's plan ('cpu', 'cuda'; None: x's own).
    """
    if not 1 <= k <= codebook.shape[1]:
        raise ValueError(f"search: k = {k}; valid: 1 <= k <= {codebook.shape[1]}, the number of codes")
    p = plan_for(x.device) if kind is None else device_plan(kind, torch.get_num_threads(), 1 << 34)
    if p["fused"] and triton_search.available(x.device, x.shape[-1]):
        return triton_search.search(x, codebook, k, p["fused"], p["block"], p["fused_tile"],
                                    max_elems or p["tile_elems"])
    return tiled_search(x, codebook, k, max_elems, compile, p)


@torch.no_grad()
def tiled_search(x, codebook, k, max_elems=None, compile=False, p=None):
    """search in torch: tiles of tokens and codes with a running top-k, so memory does not grow with
    N * C. Holds about `max_elems` scores at once (None: the plan's), plus one normalised chunk of
    codes. p: a device_plan (None: x's device)."""
    N, G, d = x.shape
    C = codebook.shape[1]
    p = p or plan_for(x.device)
    block = p["block_k1" if k == 1 else "block"]
    g_tile, n_tile, c_tile, block = plan(N, G, C, k, max_elems or p["tile_elems"], block)
    select = _maybe_compiled(topk_scores, compile and p["compile"])
    xt = x.transpose(0, 1)  # (G, N, d), a strided view the matmul reads as it is
    buf = torch.empty(g_tile * n_tile * c_tile, device=x.device, dtype=x.dtype)  # a new one per tile: page faults
    out = torch.empty(N, G, k, device=x.device, dtype=torch.long)
    ids = out.transpose(0, 1)  # (G, N, k)
    vals = torch.empty(G, N, k, device=x.device, dtype=x.dtype) if C > c_tile else None  # for merges
    for c0 in range(0, C, c_tile):
        valid = min(c_tile, C - c0)
        c = -(-valid // block) * block
        for g0 in range(0, G, g_tile):
            g = min(g_tile, G - g0)
            chunk = codebook[g0:g0 + g, c0:c0 + valid]
            # unit codes (dividing by |x| changes no ranking), laid out (g, d, c): the matmul packs a
            # transposed operand much more slowly; zero padding up to whole blocks
            inv = torch.linalg.vector_norm(chunk, dim=-1).clamp_min_(1e-12).reciprocal_()  # (g, c)
            codes_t = chunk.new_zeros(g, d, c) if c > valid else chunk.new_empty(g, d, c)
            torch.mul(chunk.transpose(1, 2), inv.unsqueeze(1), out=codes_t[:, :, :valid])
            for n0 in range(0, N, n_tile):
                n = min(n_tile, N - n0)
                s = torch.bmm(xt[g0:g0 + g, n0:n0 + n], codes_t, out=buf[:g * n * c].view(g, n, c))
                v, i = select(s, min(k, valid), valid, block)
                tile = (slice(g0, g0 + g), slice(n0, n0 + n))
                if vals is None:  # a single chunk: its top-k is the answer
                    ids[tile] = i
                elif c0 == 0:  # k <= C, so the first chunk fills all k slots
                    vals[tile], ids[tile] = v, i
                else:
                    vals[tile], ids[tile] = merge_topk(vals[tile], ids[tile], v, i + c0, k)
    return out


# -----------------------------------------------------------------------------
# the straight-through snap with the reconstruction gradient for the codes, and a lean grouped LayerNorm


class _Snap(torch.autograd.Function):
    """(xn (N, G, d), codebook, ids (N, G, k)) -> out, the mean of the k chosen codes, and the logged mse,
    sum over groups of mean over tokens of |out - xn|^2. No (N, G, k, d) tensor, forward or backward."""

    @staticmethod
    def forward(ctx, xn, codebook, ids, mse_weight):
        G, C, d = codebook.shape
        N, _, k = ids.shape
        flat_ids = (ids + torch.arange(G, device=ids.device)[:, None] * C).reshape(N * G, k)  # rows of (G*C, d)
        out = F.embedding_bag(flat_ids, codebook.reshape(G * C, d), mode="mean").view(N, G, d)
        diff = (out - xn).view(-1)
        ctx.save_for_backward(xn, out, flat_ids)  # alive anyway (the caller holds both): no extra memory
        ctx.mse_weight, ctx.shape = mse_weight, codebook.shape
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
            rows = plan_for(xn.device)["bwd_rows"]  # CPU: no temporary the size of x; GPU: few launches
            for r in range(0, N * G, rows):
                # d/d out of sum_g mean_n |out - sg(x)|^2 plus the loss gradient; each of the k codes gets 1/k
                g = torch.sub(out[r:r + rows], xn[r:r + rows]).mul_(ctx.mse_weight * 2.0 / N)
                g = g.add_(grad[r:r + rows]).div_(k)
                for j in range(k):
                    grad_codes.index_add_(0, flat_ids[r:r + rows, j], g)
            grad_codes = grad_codes.view(G, C, d)
        return grad_out, grad_codes, None, None  # straight-through to the input


class _GroupLayerNorm(torch.autograd.Function):
    """x (N, G, d) -> F.layer_norm(x, (d,)) * weight + bias with a (G, d) affine, saving only x and the
    row statistics (autograd would also keep the normalised copy, the size of x) for a fused backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        xhat, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, 1e-5)
        ctx.save_for_backward(x, weight, mean, rstd)
        return torch.addcmul(bias, xhat, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        N, G, d = x.shape
        grad = grad.contiguous()
        mask = [ctx.needs_input_grad[0], True, True]
        if G == 1:  # one affine: the fused kernel does it all (the bias argument: only its shape is read)
            dx, dw, db = torch.ops.aten.native_layer_norm_backward(
                grad.view(N, d), x.view(N, d), (d,), mean.view(N, 1), rstd.view(N, 1), weight[0], weight[0], mask)
            return None if dx is None else dx.view(N, 1, d), dw[None], db[None]
        grad_b = grad.sum(0)  # (G, d)
        grad_w = (x - mean).mul_(rstd).mul_(grad).sum(0)  # sum over tokens of grad * xhat, one temporary
        grad_x = None
        if mask[0]:  # the affine applied by hand, then one kernel for all G * N rows
            grad_x = torch.ops.aten.native_layer_norm_backward(
                (grad * weight).view(N * G, d), x.reshape(N * G, d), (d,), mean.reshape(N * G, 1),
                rstd.reshape(N * G, 1), None, None, [True, False, False])[0].view(N, G, d)
        return grad_x, grad_w, grad_b


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
    def __init__(self, dim, num_codes, k=1, groups=1, mse_weight=1.0, compile=False, max_elems=None):
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
        return _GroupLayerNorm.apply(x.reshape(-1, self.groups, d), self.ln_weight, self.ln_bias)

    def forward(self, x, interventions=()):
        if interventions and self.training:
            raise RuntimeError("interventions are for inference only: call model.eval() first")
        with torch.autocast(x.device.type, enabled=False):  # under bf16 autocast the layer stays fp32:
            return self._forward(x, interventions)  # a bf16 search would pick other codes than fp32's

    def _forward(self, x, interventions):
        xn = self.normalize(x.float())  # (N, G, d)
        N, G, d = xn.shape
        T = x.shape[-2] if x.dim() >= 3 else N
        n_ablate = max([sum(iv.ablate and iv.group == g for iv in interventions) for g in range(G)], default=0)
        ids = search(xn.detach(), self.codebook.detach(), min(self.k + n_ablate, self.num_codes),
                     self.max_elems, self.compile)
        if interventions:
            ids = apply_interventions(ids, interventions, self.k, T)
        out, mse = _Snap.apply(xn, self.codebook, ids, self.mse_weight)
        with torch.no_grad():
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
