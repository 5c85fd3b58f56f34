"""
The codebook search as fused Triton kernels, for CUDA: the (tokens x codes) score matrix is never written.

    from tuned import triton_kernels
    ids = triton_kernels.search(x, codebook, k)  # x (N, G, d) -> ids (N, G, k), as a brute-force topk

tiled.search calls it on a GPU when PLANS["cuda"]["fused"] names a precision. On a CPU the kernels run
only under Triton's interpreter (TRITON_INTERPRET=1 before the first import of triton), which is how the
tests check them; the CPU path stays pure torch.

Why fused: on a GPU the torch search writes every score of a tile to memory and reads it back for the
max, so it costs several times the score matmul. A kernel that keeps each tile of scores in registers
needs only its inputs. Tensor cores then make the matmul itself cheap, but in TF32, which rounds the
inputs; a near-tie could swap ids. So a search is a candidate pass and a proof, then an exact pass:

  1. candidates, in `precision` on tensor cores ("tf32x3", three TF32 products, is near fp32; "tf32";
     "ieee", fp32 without tensor cores):
     k = 1:  a running top 3 per token: its two best codes, scored again exactly, and the third score;
     k > 1:  the maximum of every block of `block` consecutive codes; torch's topk then keeps the k + 2
             best blocks (the k best codes lie in the k blocks with the best maxima), and a second
             kernel scores the codes of the first k + 1 exactly, in fp32.
     One candidate more than k needs: a near-tie at the k-th place is then settled by exact scores
     instead of the exact kernel (emulated on random inputs and on a trained TokFSM model, that left
     10-100x fewer tokens unproven).
  2. a proof: the rounding error of a score is at most eps = eps_rel(d, precision) * |x| (|code| = 1).
     Codes left out score at most `bound` (the third-best score, or the (k+2)-th block maximum) plus
     eps; if that is below the k-th exact score, the exact top-k is among the candidates. Tokens where it
     is not proven (near-ties of three or more codes) are searched again, exactly, by a third kernel
     in fp32 without tensor cores; its programs with no such token stop at once. The official code
     syncs with the host at every forward; this search never does.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch: tiled.search stays on its torch path
    triton = None

# (tokens, codes, warps) of the exact kernel's programs. Its fp32 dot keeps whole operand rows per thread:
# compiled for an H100 (sm_90), 64 x 64 tiles spilled registers at d = 32-128 (up to ~2 KB a thread);
# 32 x 32 with 4 warps hardly does (test_all.py compiles it and checks). It runs only where the proof failed.
EXACT_TILE = (32, 32, 4)

# The widest group (d) the kernels take; wider ones stay on the torch search. A program holds its tokens
# (BM x d) in registers: compiled for sm_90 at d = 256, every kernel spilled (test_all.py checks d <= 128).
MAX_WIDTH = 128


def available(device, d=None):
    """Whether the kernels run on tensors of this device for groups d wide (None: any width they take):
    an NVIDIA GPU from Ampere (sm_80) on, with Triton, or Triton's interpreter on a CPU. The candidate
    pass exists for TF32 tensor cores; older GPUs have none, and there it is an fp32 search that holds
    its operands in registers (compiled for sm_75 it spilled 2 KB at d = 128), so they keep the torch one."""
    if triton is None or (d is not None and d > MAX_WIDTH):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def eps_rel(d, precision):
    """A bound on |score error| / (|x| |code|) for a d-wide dot product: input rounding (TF32 keeps 10
    mantissa bits; taken as truncation, u = 2^-10) plus fp32 accumulation, for the candidate pass and
    for the exact scores compared with it, doubled for margin."""
    u = 2.0 ** -10
    rounding = {"ieee": 0.0, "tf32": 2 * u + u * u, "tf32x3": 3 * u * u * (1 + u) ** 2}[precision]
    sums = (3 if precision == "tf32x3" else 1) * d + 2 * d  # additions: candidate pass, exact pass, brute force
    return 2 * (rounding + sums * 2.0 ** -23)


if triton is not None:

    @triton.jit
    def _load_x(x_ptr, g, N, d, sxn, sxg, BM: tl.constexpr, D: tl.constexpr):
        """The (BM, D) block of tokens of this program, group g; zero past N and past d."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        dd = tl.arange(0, D)
        mask = (rows[:, None] < N) & (dd[None, :] < d)
        return rows, tl.load(x_ptr + rows[:, None] * sxn + g * sxg + dd[None, :], mask=mask, other=0.0)

    @triton.jit
    def _scores(x, u_ptr, g, c0, C, d, PREC: tl.constexpr, D: tl.constexpr, BC: tl.constexpr):
        """(BM, BC) scores of the tokens x against codes c0 ... c0 + BC - 1 of group g; -inf past C."""
        cols = c0 + tl.arange(0, BC)
        dd = tl.arange(0, D)
        u = tl.load(u_ptr + (g * C + cols[:, None]).to(tl.int64) * d + dd[None, :],
                    mask=(cols[:, None] < C) & (dd[None, :] < d), other=0.0)  # (BC, D) unit codes
        s = tl.dot(x, tl.trans(u), input_precision=PREC)
        return tl.where(cols[None, :] < C, s, float("-inf"))

    @triton.jit
    def _top1_kernel(x_ptr, u_ptr, arg_ptr, third_ptr, N, C, d, sxn, sxg,
                     PREC: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
        """Per token of group g = program_id(1): its two best codes (arg (2, G, N)) and the third-best
        score (third (G, N)), as a running merge of each tile's top 3 into the top 3 so far."""
        g = tl.program_id(1)
        rows, x = _load_x(x_ptr, g, N, d, sxn, sxg, BM, D)
        b1 = tl.full((BM,), float("-inf"), tl.float32)
        b2 = tl.full((BM,), float("-inf"), tl.float32)
        b3 = tl.full((BM,), float("-inf"), tl.float32)
        i1 = tl.zeros((BM,), tl.int32)
        i2 = tl.zeros((BM,), tl.int32)
        cols = tl.arange(0, BC)
        for c0 in range(0, C, BC):
            s = _scores(x, u_ptr, g, c0, C, d, PREC, D, BC)
            m1 = tl.max(s, axis=1)
            a1 = tl.argmax(s, axis=1)
            s = tl.where(cols[None, :] == a1[:, None], float("-inf"), s)
            m2 = tl.max(s, axis=1)
            a2 = tl.argmax(s, axis=1)
            m3 = tl.max(tl.where(cols[None, :] == a2[:, None], float("-inf"), s), axis=1)
            a1 += c0
            a2 += c0
            # merge (b1 >= b2 >= b3) with (m1 >= m2 >= m3); a tie keeps the earlier codes
            old = b1 >= m1  # the best so far stays first; the second is then b2 or m1
            o2 = b2 >= m1
            n2 = b1 >= m2  # else m1 is first; the second is then b1 or m2
            t3 = tl.where(old, tl.where(o2, tl.maximum(b3, m1), tl.maximum(b2, m2)),
                          tl.where(n2, tl.maximum(b2, m2), tl.maximum(b1, m3)))
            j2 = tl.where(old, tl.where(o2, i2, a1), tl.where(n2, i1, a2))
            t2 = tl.where(old, tl.where(o2, b2, m1), tl.where(n2, b1, m2))
            i1 = tl.where(old, i1, a1)
            b1 = tl.where(old, b1, m1)
            i2, b2, b3 = j2, t2, t3
        out = g * N + rows
        tl.store(arg_ptr + out, i1, mask=rows < N)
        tl.store(arg_ptr + N * tl.num_programs(1) + out, i2, mask=rows < N)
        tl.store(third_ptr + out, b3, mask=rows < N)

    @triton.jit
    def _block_max_kernel(x_ptr, u_ptr, m_ptr, N, C, d, nb, sxn, sxg, PREC: tl.constexpr, D: tl.constexpr,
                          BM: tl.constexpr, BC: tl.constexpr, B: tl.constexpr):
        """m (G, N, nb): the maximum score of each block of B consecutive codes (block j: codes jB ... jB+B-1)."""
        g = tl.program_id(1)
        rows, x = _load_x(x_ptr, g, N, d, sxn, sxg, BM, D)
        for c0 in range(0, C, BC):
            s = _scores(x, u_ptr, g, c0, C, d, PREC, D, BC)
            bmax = tl.max(tl.reshape(s, (BM, BC // B, B)), axis=2)  # (BM, BC // B)
            blocks = c0 // B + tl.arange(0, BC // B)
            tl.store(m_ptr + (g * N + rows[:, None]).to(tl.int64) * nb + blocks[None, :], bmax,
                     mask=(rows[:, None] < N) & (blocks[None, :] < nb))

    @triton.jit
    def _rerank_kernel(x_ptr, u_ptr, j_ptr, s_ptr, N, C, d, sxn, sxg, M, D: tl.constexpr, BM: tl.constexpr,
                       B: tl.constexpr):
        """s (G, M * B, N): exact fp32 scores of the codes in each token's M candidate blocks j (G, M, N).
        Laid out tokens last, so that a program's loads and stores are contiguous runs of tokens."""
        g = tl.program_id(1)
        rows, x = _load_x(x_ptr, g, N, d, sxn, sxg, BM, D)
        live = rows < N
        dd = tl.arange(0, D)
        for i in range(0, M * B):  # one candidate code per token at a time: (BM, D) in registers
            code = tl.load(j_ptr + (g * M + i // B) * N + rows, mask=live, other=0) * B + i % B  # (BM,)
            ok = (code < C) & live
            u = tl.load(u_ptr + (g * C + code[:, None]).to(tl.int64) * d + dd[None, :],
                        mask=ok[:, None] & (dd[None, :] < d), other=0.0)
            s = tl.where(code < C, tl.sum(x * u, axis=1), float("-inf"))
            tl.store(s_ptr + (g * M * B + i).to(tl.int64) * N + rows, s, mask=live)

    @triton.jit
    def _exact_kernel(x_ptr, u_ptr, redo_ptr, ids_ptr, N, C, d, sxn, sxg, K, D: tl.constexpr, BM: tl.constexpr,
                      BC: tl.constexpr):
        """ids (G, N, K): the exact top-K of the tokens whose redo (G, N) is set, in fp32 without tensor
        cores; programs with no such token stop at once. K passes over the codes, each taking the best
        code after the last one taken in the order (score descending, id ascending): no list of taken
        codes to hold, and an exact tie goes to the lower id."""
        g = tl.program_id(1)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        redo = tl.load(redo_ptr + g * N + rows, mask=rows < N, other=0) != 0
        if tl.max(redo.to(tl.int32), axis=0) > 0:
            rows, x = _load_x(x_ptr, g, N, d, sxn, sxg, BM, D)
            cols = tl.arange(0, BC)
            last = tl.full((BM,), float("inf"), tl.float32)
            last_id = tl.full((BM,), -1, tl.int32)
            for r in range(0, K):
                best = tl.full((BM,), float("-inf"), tl.float32)
                arg = tl.zeros((BM,), tl.int32)
                for c0 in range(0, C, BC):
                    s = _scores(x, u_ptr, g, c0, C, d, "ieee", D, BC)
                    after = (s < last[:, None]) | ((s == last[:, None]) & (c0 + cols[None, :] > last_id[:, None]))
                    s = tl.where(after, s, float("-inf"))
                    m = tl.max(s, axis=1)
                    take = m > best  # a tie keeps the earlier tile's, lower id
                    arg = tl.where(take, tl.argmax(s, axis=1) + c0, arg)
                    best = tl.where(take, m, best)
                tl.store(ids_ptr + (g * N + rows).to(tl.int64) * K + r, arg, mask=redo)
                last, last_id = best, arg


# Pipeline stages of a kernel's loop: Triton's default, 3, unless this GPU's shared memory per block is too
# small for it. At d = 128 the candidate kernels take 128 KB with 3 stages on sm_80-89, where an RTX 3090
# or 4090 has 99 KB (an A100 163 KB, an H100 227 KB); with 2 they take 97 KB. Triton checks the size before
# it launches, so the first call with a new (kernel, tile, device) tries 3, 2, 1 and the count is kept here.
_stages = {}


def _launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta) with the most pipeline stages (at most 3) that fit this GPU."""
    key = (kernel, args[0].device, tuple(sorted(meta.items())))
    for s in range(_stages.get(key, 3), 0, -1):
        try:
            kernel[grid](*args, num_stages=s, **meta)
        except triton.runtime.OutOfResources:
            if s == 1:
                raise
            continue
        _stages[key] = s
        return


def unit(codebook):
    """(G, C, d) -> the codes scaled to length 1, fp32, contiguous: what the kernels read."""
    return (codebook / torch.linalg.vector_norm(codebook, dim=-1, keepdim=True).clamp_min(1e-12)).float().contiguous()


def _fp32_rows(x):
    """x as fp32 whose last dimension is contiguous, as the kernels read it (its other strides are passed)."""
    x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def _width(d):
    return max(16, triton.next_power_of_2(d))  # a kernel's D: a power of 2, and tl.dot needs >= 16


def candidates(x, u, k, precision="tf32x3", block=16, tile=(64, 64, 4), max_elems=1 << 26):
    """Pass 1 and the proof: x (N, G, d), unit codes u (G, C, d) (from unit()) -> ids (G, N, k),
    proven (G, N) bool. Where proven, ids are the exact top-k, best first.
    tile: (tokens, codes, warps) of a kernel program. max_elems: block maxima held at once (k > 1),
    so memory does not grow with N * C: chunks of tokens."""
    BM, BC, _ = tile
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"groups of d = {x.shape[-1]}: the fused kernels take d <= {MAX_WIDTH} "
                         "(tiled.search keeps wider ones on its torch path)")
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    if not (pow2(BM) and pow2(BC) and pow2(block) and BM >= 16 and BC >= 16):
        raise ValueError(f"fused tile {tile} and block {block}: tokens, codes and block must be powers of 2, "
                         "tokens and codes at least 16")
    N, G, _ = x.shape
    n = max(1, N if k == 1 else max_elems // (G * triton.cdiv(u.shape[1], block)))  # tokens a chunk
    x = _fp32_rows(x)
    parts = [_candidates(x[n0:n0 + n], u, k, precision, block, tile) for n0 in range(0, max(N, 1), n)]
    return tuple(torch.cat(t, dim=1).contiguous() for t in zip(*parts))  # (G, N, k), (G, N)


def _candidates(x, u, k, precision, block, tile):
    N, G, d = x.shape
    C = u.shape[1]
    BM, BC, warps = tile
    D = _width(d)
    eps = eps_rel(d, precision) * torch.linalg.vector_norm(x, dim=-1).T  # (G, N)
    grid = (triton.cdiv(N, BM), G)
    args = (N, C, d, x.stride(0), x.stride(1))
    if k == 1:
        third = torch.empty(G, N, device=x.device)
        arg = torch.empty(2, G, N, device=x.device, dtype=torch.int32)
        _launch(_top1_kernel, grid, x, u, arg, third, *args, PREC=precision, D=D, BM=BM, BC=BC, num_warps=warps)
        two = arg.permute(1, 2, 0).long()  # (G, N, 2): both scored exactly, so a near-tie between them is settled
        codes = u.gather(1, two.reshape(G, 2 * N, 1).expand(G, 2 * N, d)).view(G, N, 2, d)
        # products and a sum, not a matmul: TF32 (set_float32_matmul_precision("high")) cannot round them
        best, j = (x.transpose(0, 1).unsqueeze(2) * codes).sum(-1).max(dim=-1, keepdim=True)  # (G, N, 1)
        return two.gather(-1, j), third + eps < best[..., 0]
    nb = triton.cdiv(C, block)
    m = min(k + 1, nb)  # blocks re-ranked: k hold the k best codes, one more settles near-ties exactly
    maxima = torch.empty(G, N, nb, device=x.device)
    _launch(_block_max_kernel, grid, x, u, maxima, *args[:3], nb, *args[3:], PREC=precision, D=D, BM=BM,
            BC=max(BC, block), B=block, num_warps=warps)
    top = maxima.topk(min(m + 1, nb), dim=-1)  # (G, N, m + 1): the last maximum bounds every other code
    J = top.indices[..., :m]  # (G, N, m)
    bound = top.values[..., m] if nb > m else torch.full((G, N), float("-inf"), device=x.device)
    scores = torch.empty(G, m * block, N, device=x.device)
    J32 = J.transpose(1, 2).to(torch.int32).contiguous()  # (G, m, N)
    _launch(_rerank_kernel, grid, x, u, J32, scores, *args, m, D=D, BM=BM, B=block, num_warps=warps)
    v, p = scores.transpose(1, 2).topk(k, dim=-1)  # (G, N, k) exact, best first
    ids = J.gather(-1, torch.div(p, block, rounding_mode="floor")) * block + p % block
    return ids, bound + eps < v[..., -1]


def search(x, codebook, k, precision="tf32x3", block=16, tile=(64, 64, 4), max_elems=1 << 26):
    """Ids of the k codes most cosine-similar to each input, slot 0 the best: x (N, G, d),
    codebook (G, C, d) -> (N, G, k) int64, the same as a brute-force fp32 topk (up to exact ties).
    Tokens whose candidates are not proven get the exact kernel's ids, so there is no host sync.
    max_elems: as in candidates."""
    N, G, d = x.shape
    x, u = _fp32_rows(x), unit(codebook)
    ids, proven = candidates(x, u, k, precision, block, tile, max_elems)  # (G, N, k), (G, N)
    BM, BC, warps = EXACT_TILE
    _launch(_exact_kernel, (triton.cdiv(N, BM), G), x, u, ~proven, ids, N, u.shape[1], d, x.stride(0),
            x.stride(1), k, D=_width(d), BM=BM, BC=BC, num_warps=warps)
    return ids.transpose(0, 1)  # (N, G, k)
