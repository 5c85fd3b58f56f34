"""
The tuned codebook search: the same ids as codebook.search, found faster on each kind of device, and a
LayerNorm whose backward keeps less. tuned.use_tuned_search(model) puts them into a model's codebook layers;
a test holds them to codebook.py's plain ones, the same ids and gradients.

    from tuned import tiled
    ids = tiled.search(x, codebook, k)      # x (N, G, d), codebook (G, C, d) -> ids (N, G, k)
    tiled.PLANS["cuda"]["fused"] = "tf32x3"  # try triton_kernels.py's fused kernels on a GPU

The work is one (N, d) @ (d, C) score matmul per group. What makes it slow is everything around it, and
that differs per device. On a CPU a full (N, C) score matrix does not fit in cache, and torch.topk costs
more per score than the matmul: so scores are made a tile (about 2 MB a thread) at a time into one reused
buffer, and a tile's top-k is found through strided blocks (the k best codes lie in the k blocks with the
best maxima, so one vectorised max pass touches every score and topk sees 1/16 of them, plus 16k
candidates). On a GPU each op is a kernel launch: cache-sized tiles meant thousands of tiny kernels, so
a GPU gets tiles of tens of millions of scores. Only cosine similarity is tuned here: a codebook with
another similarity changes codebook.similarity and leaves out use_tuned_search.
"""

import torch

from codebook import exact_fp32
from tuned import triton_kernels

# -----------------------------------------------------------------------------
# the plans: every per-device choice of the search, in one place

_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")  # the vector ISA torch's kernels use

# Each choice was measured with benchmarks/search.py on a 2-core CPU and an H200 (results/README.md, "Speed"):
#   tile_elems  scores held at once (on a CPU per thread, cache-sized; on CUDA large, since every tile is
#               ~10 small kernels after its matmul, and at most 1/8 of the free memory)
#   block_k1    block size of the top-1 pass (1: a plain max over the codes, one read of the scores,
#               which beat the block maxima on the GPU)
#   k1_blocks   codes a row from which the top-1 pass takes block maxima (below: a plain max). torch's max
#               with indices is a scalar loop and the block maxima a vectorised elementwise max, so it
#               depends on the CPU's vector instructions: at C = 1024 the blocks made top-1 20% faster on
#               a 2-core AMD EPYC (AVX2), and a plain max 5-10% faster on a 2-core Xeon (AVX-512), where
#               the blocks won from C = 2048
#   block       block size of the top-k pass, k > 1
#   bwd_rows    rows of (tokens x groups) per step of the codes' gradient scatter (CPU: no temporary
#               the size of x; GPU: few launches)
#   compile     whether compile=True compiles a tile's top-k here (on the GPU it gained little or lost)
#   fused       None: the torch tiles above; or the tensor-core precision of triton_search's fused
#               kernels ("tf32x3", "tf32", "ieee"), which never write the scores (CUDA with Triton only).
#               Off until timed on a GPU: python -m benchmarks.search --fused=tf32x3 measures it
#   fused_tile  (tokens, codes, warps) of a program of the fused candidate kernels; their k > 1 pass
#               takes the maxima of `block` consecutive codes
PLANS = {
    "cpu": dict(tile_elems=1 << 19, block_k1=16, k1_blocks=2048 if _AVX512 else 1024, block=16, bwd_rows=8192,
                compile=True, fused=None, fused_tile=None),
    "cuda": dict(tile_elems=1 << 26, block_k1=1, k1_blocks=1024, block=16, bwd_rows=1 << 16, compile=False,
                 fused=None, fused_tile=(64, 64, 4)),
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


def scatter_rows(device):
    """Rows per step of the codes' gradient scatter on this device (CodebookLayer.scatter_rows)."""
    return plan_for(device)["bwd_rows"]


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


def plan(N, G, C, k, max_elems=1 << 19, block=16, k1_blocks=1024):
    """Tile sizes (groups, tokens, codes) and block size: about max_elems scores a tile, at least 32
    tokens a matmul, and as few code chunks as possible (each adds a merge and topk's per-row cost);
    tokens before groups (each group's codes are packed anew for the matmul). block: the device's block
    size for this k (device_plan), used where a row has >= 64 blocks, and for k = 1 from k1_blocks codes
    and 2^17 scores (the blocks' four more ops cost more than they save on a few tokens: generation)."""
    c = max(k, -(-C // -(-C * 32 // max_elems)))  # C split evenly into chunks of <= max_elems / 32 codes
    wide = c >= k1_blocks and N * G * c >= 1 << 17 if k == 1 else c >= 1024
    block = block if wide and c >= 64 * k else 1
    c = -(-c // block) * block  # whole blocks (the last chunk is padded)
    n = max(1, min(N, max_elems // c))
    return max(1, min(G, max_elems // (n * c))), n, c, block


@torch.no_grad()
def search(x, codebook, k, max_elems=None, compile=False, kind=None):
    """codebook.search, tuned: ids of the k codes most cosine-similar to each input, slot 0 the best.

    x (N, G, d), codebook (G, C, d) -> ids (N, G, k) int64, the same as a brute-force fp32 topk over all
    scores (up to exact ties). The device's plan picks the way: triton_search's fused kernels where
    it names a precision, Triton runs and d <= triton_kernels.MAX_WIDTH, else tiled_search.
    kind: follow another device kind's plan ('cpu', 'cuda'; None: x's own).
    """
    if not 1 <= k <= codebook.shape[1]:
        raise ValueError(f"search: k = {k}; valid: 1 <= k <= {codebook.shape[1]}, the number of codes")
    p = plan_for(x.device) if kind is None else device_plan(kind, torch.get_num_threads(), 1 << 34)
    with exact_fp32():
        if p["fused"] and triton_kernels.available(x.device, x.shape[-1]):
            return triton_kernels.search(x, codebook, k, p["fused"], p["block"], p["fused_tile"],
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
    g_tile, n_tile, c_tile, block = plan(N, G, C, k, max_elems or p["tile_elems"], block, p["k1_blocks"])
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
# a grouped LayerNorm that saves only its input and row statistics


def group_layer_norm(x, weight, bias):
    """x (N, G, d) -> LayerNorm over d with a (G, d) affine: F.layer_norm's result, less memory kept."""
    return _GroupLayerNorm.apply(x, weight, bias)


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
