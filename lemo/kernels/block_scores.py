"""Block-level token-informativeness scores from attention scores (LeMo).

Source: LeMo, arXiv 2501.09767, Eq. 1-2: a token is informative when it receives
attention mass from later queries. We measure this per block of ``block_size``
tokens, without ever forming the L x L attention matrix.

Math. Inputs ``q`` (B, Hq, L, D) and ``k`` (B, Hkv, L, D), post-RoPE; Hq = g * Hkv
(GQA: query head h reads key head h // g). For allowed pairs (i, j)

    P[b, i, j] = (1 / Hq) * sum_h relu(scale * <q[b, h, i], k[b, h // g, j]>)

and P = 0 elsewhere. A pair is allowed when j <= i (causal), both indices are
< L, and, if ``doc_ids`` (B, L) is given, doc_ids[b, i] == doc_ids[b, j] >= 0
(-1 marks padding; equal ids cover packed documents). Accumulation is fp32.

With nb = ceil(L / bs), the block map is the tile max

    M[b, I, J] = max_{i in block I, j in block J} P[b, i, j]      (B, nb, nb) fp32,

zero for J > I and for tiles with no allowed pair, and the key-block scores are
its column sums ``M.sum(dim=1)`` -> (B, nb): how strongly any query block attends
to key block J.

Three implementations:

* ``block_scores_reference`` -- plain torch, builds L x L (tests only).
* ``block_scores_torch``     -- segmented torch: query blocks in chunks, one KV
  head group at a time; memory linear in L. Fallback without Triton.
* ``block_scores``           -- Triton, FlashAttention-style tiling; never
  materialises more than an (R*bs, R*bs) tile per program (R: launch config).
"""

from __future__ import annotations

import torch

# Triton is optional: block_scores_torch is the fallback.
from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import interpreter_on as _interpreter_on
from ._triton import tl, triton

__all__ = ["block_scores", "block_scores_reference", "block_scores_torch"]


# --------------------------------------------------------------------------- checks
def _check_inputs(q, k, block_size, doc_ids):
    """Validate shapes/dtypes; return (B, Hq, Hkv, L, D, g)."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise ValueError("q and k must be torch tensors")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, L, D); got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    B, Hq, L, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or Lk != L or Dk != D:
        raise ValueError(
            f"shape mismatch: q (B, Hq, L, D)={tuple(q.shape)} vs k (B, Hkv, L, D)={tuple(k.shape)}; "
            "batch, sequence length and head_dim must match"
        )
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"number of query heads Hq={Hq} must be a multiple of key heads Hkv={Hkv} (GQA)")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise ValueError(f"q and k must be floating point; got {q.dtype}, {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k on different devices: {q.device} vs {k.device}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    if doc_ids is not None:
        if not isinstance(doc_ids, torch.Tensor) or tuple(doc_ids.shape) != (B, L):
            shape = tuple(doc_ids.shape) if isinstance(doc_ids, torch.Tensor) else type(doc_ids)
            raise ValueError(f"doc_ids must have shape (B, L)=({B}, {L}); got {shape}")
        if doc_ids.is_floating_point() or doc_ids.is_complex() or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be an integer tensor (int32/int64); got {doc_ids.dtype}")
        if doc_ids.device != q.device:
            raise ValueError(f"doc_ids on {doc_ids.device} but q on {q.device}")
    return B, Hq, Hkv, L, D, Hq // Hkv


def _default_scale(D, scale):
    return D**-0.5 if scale is None else float(scale)


# --------------------------------------------------------------------------- torch reference
def block_scores_reference(q, k, block_size=64, scale=None, doc_ids=None) -> torch.Tensor:
    """Plain-torch block map (B, nb, nb) fp32. Builds the full L x L matrix: tests only."""
    B, Hq, Hkv, L, D, g = _check_inputs(q, k, block_size, doc_ids)
    scale = _default_scale(D, scale)
    bs = block_size
    nb = -(-L // bs)
    kk = k.float().repeat_interleave(g, dim=1)  # (B, Hq, L, D): head h -> kv head h // g
    s = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale  # (B, Hq, L, L)
    p = torch.relu(s).sum(dim=1) / Hq  # (B, L, L)
    i = torch.arange(L, device=q.device)
    allowed = (i[None, :] <= i[:, None]).expand(B, L, L)
    if doc_ids is not None:
        d = doc_ids.long()
        allowed = allowed & (d[:, :, None] == d[:, None, :]) & (d[:, :, None] >= 0)
    p = torch.where(allowed, p, torch.zeros((), dtype=p.dtype, device=p.device))
    pad = nb * bs - L
    p = torch.nn.functional.pad(p, (0, pad, 0, pad))  # padded rows/cols are 0 (= not allowed)
    return p.view(B, nb, bs, nb, bs).amax(dim=(2, 4))


# --------------------------------------------------------------------------- segmented torch
@torch.no_grad()
def block_scores_torch(q, k, block_size=64, scale=None, doc_ids=None, return_map=True, query_chunk=512):
    """Segmented torch implementation; never builds the L x L matrix.

    Query rows are processed in chunks of whole query blocks (``query_chunk`` rounded
    up to a multiple of ``block_size``); a chunk ending at row r1 only sees keys
    [0, r1) (causal). Within a chunk, one KV head and its g query heads are done per
    batched matmul (no GQA copy of k), relu'd in place and summed over heads in fp32.
    Peak extra memory ~ B * chunk * L * (g * itemsize + 4 + 1) bytes.

    Note: the matmul runs in the input dtype (bf16/fp16 scores are rounded once to
    that dtype before the fp32 head sum); the Triton path accumulates in fp32.

    Returns (map (B, nb, nb) fp32 or None, column sums (B, nb) fp32).
    """
    B, Hq, Hkv, L, D, g = _check_inputs(q, k, block_size, doc_ids)
    scale = _default_scale(D, scale)
    if not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive int; got {query_chunk!r}")
    bs = block_size
    nb = -(-L // bs)
    dev = q.device
    colsum = torch.zeros(B, nb, dtype=torch.float32, device=dev)
    bmap = torch.zeros(B, nb, nb, dtype=torch.float32, device=dev) if return_map else None
    if L == 0:
        return bmap, colsum

    dtype = torch.promote_types(q.dtype, k.dtype)
    # relu(scale * x) = |scale| * relu(sign(scale) * x): fold the sign into q (exact),
    # apply |scale| / Hq once on the (tiny) block maxima.
    sign = -1.0 if scale < 0 else 1.0
    factor = abs(scale) / Hq
    qv = q.to(dtype).view(B, Hkv, g, L, D)  # splitting the head dim is always a view
    kt = k.to(dtype).transpose(-1, -2)  # (B, Hkv, D, L)
    docs = doc_ids.long() if doc_ids is not None else None

    chunk_blocks = max(1, -(-query_chunk // bs))
    pos = torch.arange(L, device=dev)
    for I0 in range(0, nb, chunk_blocks):
        I1 = min(nb, I0 + chunk_blocks)
        r0, r1 = I0 * bs, min(L, I1 * bs)  # query rows [r0, r1); keys [0, r1)
        rows, keys = r1 - r0, r1
        acc = torch.zeros(B, I1 * bs - r0, I1 * bs, dtype=torch.float32, device=dev)  # block-padded
        acc_v = acc[:, :rows, :keys]
        for h in range(Hkv):
            qc = qv[:, h, :, r0:r1]  # (B, g, rows, D)
            if sign < 0:
                qc = -qc
            s = torch.matmul(qc.reshape(B, g * rows, D), kt[:, h, :, :keys])  # (B, g*rows, keys)
            s.relu_()
            acc_v += s.view(B, g, rows, keys).sum(dim=1, dtype=torch.float32)
            del s
        # causal: only the diagonal band (keys >= r0) needs masking
        acc_v[:, :, r0:].masked_fill_(pos[r0:keys][None, :] > pos[r0:r1][:, None], 0.0)
        if docs is not None:
            dq = docs[:, r0:r1, None]
            ok = (dq == docs[:, None, :keys]) & (dq >= 0)
            acc_v.masked_fill_(~ok, 0.0)
        blk = acc.view(B, I1 - I0, bs, I1, bs).amax(dim=(2, 4)).mul_(factor)  # (B, I1-I0, I1)
        del acc, acc_v
        colsum[:, :I1] += blk.sum(dim=1)
        if bmap is not None:
            bmap[:, I0:I1, :I1] = blk
    return bmap, colsum


# --------------------------------------------------------------------------- Triton kernel
if _HAS_TRITON:

    @triton.jit
    def _head_scores(
        q_base, k_base, h, GROUP: tl.constexpr, sqh, skh, row_in, col_in, PRECISION: tl.constexpr, NEG: tl.constexpr
    ):
        """Query head h's (R*BS, R*BS) score tile against its KV head's keys, sign folded in (relu comes after)."""
        kt = tl.trans(tl.load(k_base + (h // GROUP) * skh, mask=col_in[:, None], other=0.0))
        qt = tl.load(q_base + h * sqh, mask=row_in[:, None], other=0.0)
        s = tl.dot(qt, kt, input_precision=PRECISION)
        if NEG:
            s = -s
        return s

    @triton.jit
    def _block_scores_kernel(
        q_ptr,
        k_ptr,
        doc_ptr,
        map_ptr,
        L,
        n_kv_heads,
        factor,
        sqb,
        sqh,
        sql,
        sqd,
        skb,
        skh,
        skl,
        skd,
        sdb,
        sdl,
        smb,
        smi,
        smj,
        GROUP: tl.constexpr,  # query heads per KV head (Hq // Hkv)
        BS: tl.constexpr,  # block size (rows and cols of a block)
        R: tl.constexpr,  # a program covers R x R blocks (a super-tile of R*BS rows and cols)
        D: tl.constexpr,  # head dim
        HAS_DOC: tl.constexpr,
        NEG: tl.constexpr,  # scale < 0: relu(scale*x) = |scale| * relu(-x)
        PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 inputs)
        FLAT: tl.constexpr,  # one loop over query heads (software-pipelined loads) instead of KV head x group
        STAGES: tl.constexpr,  # pipeline depth of the flat loop
        LOOKAHEAD: tl.constexpr,  # flat loop: the next head's product is issued before this head's epilogue
    ):
        # Grid: (number of lower-triangular super-tiles, B). One program per (SI, SJ <= SI)
        # super-tile of R x R blocks. The head sum must finish before the block max, so
        # q and k tiles are loaded once per head and program; a larger R makes each load
        # feed R times more MACs (arithmetic intensity ~ R * BS), at the price of the
        # R(R-1)/2 wasted blocks above the diagonal of each diagonal super-tile and a
        # (R*BS)^2 fp32 accumulator. R = 1 gives nb(nb+1)/2 * B equal-cost programs, enough
        # CTAs to fill 132 SMs even at short L. Super-tiles are enumerated row-major
        # (t = SI(SI+1)/2 + SJ), so neighbouring programs share the q rows (L2 reuse).
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        tf = (8 * t + 1).to(tl.float32)
        SI = ((tl.sqrt(tf) - 1.0) * 0.5).to(tl.int64)
        # fix fp32 rounding of sqrt (off by at most one)
        SI = tl.where(SI * (SI + 1) // 2 > t, SI - 1, SI)
        SI = tl.where((SI + 1) * (SI + 2) // 2 <= t, SI + 1, SI)
        SJ = t - SI * (SI + 1) // 2

        rows = SI * (R * BS) + tl.arange(0, R * BS).to(tl.int64)  # query positions
        cols = SJ * (R * BS) + tl.arange(0, R * BS).to(tl.int64)  # key positions
        dd = tl.arange(0, D).to(tl.int64)
        row_in = rows < L
        col_in = cols < L

        q_base = q_ptr + b * sqb + rows[:, None] * sql + dd[None, :] * sqd  # (R*BS, D)
        k_base = k_ptr + b * skb + cols[:, None] * skl + dd[None, :] * skd  # (R*BS, D)

        acc = tl.zeros((R * BS, R * BS), dtype=tl.float32)
        if LOOKAHEAD:
            # The flat loop, with the product of head h issued before the epilogue (relu, add) of head h - 1,
            # so the tensor cores need not idle while the accumulator is updated (if the compiler keeps
            # the product asynchronous).
            s = _head_scores(q_base, k_base, 0, GROUP, sqh, skh, row_in, col_in, PRECISION, NEG)
            for h in tl.range(1, n_kv_heads * GROUP, num_stages=STAGES):
                s_next = _head_scores(q_base, k_base, h, GROUP, sqh, skh, row_in, col_in, PRECISION, NEG)
                acc += tl.maximum(s, 0.0)
                s = s_next
            acc += tl.maximum(s, 0.0)
        elif FLAT:
            # One loop over query heads: the innermost loop, so Triton prefetches the next head's tiles
            # while this one's product runs; a GQA key tile is loaded once per query head (L2 hits).
            for h in tl.range(0, n_kv_heads * GROUP, num_stages=STAGES):
                s = _head_scores(q_base, k_base, h, GROUP, sqh, skh, row_in, col_in, PRECISION, NEG)
                acc += tl.maximum(s, 0.0)
        else:
            for kvh in range(n_kv_heads):
                # GQA: load each key tile once and reuse it for its GROUP query heads
                kt = tl.trans(tl.load(k_base + kvh * skh, mask=col_in[:, None], other=0.0))
                for r in range(GROUP):
                    qt = tl.load(q_base + (kvh * GROUP + r) * sqh, mask=row_in[:, None], other=0.0)
                    s = tl.dot(qt, kt, input_precision=PRECISION)  # input dtype, fp32 accumulate
                    if NEG:
                        s = -s
                    acc += tl.maximum(s, 0.0)

        allowed = (cols[None, :] <= rows[:, None]) & row_in[:, None] & col_in[None, :]
        if HAS_DOC:
            dq = tl.load(doc_ptr + b * sdb + rows * sdl, mask=row_in, other=-1)
            dk = tl.load(doc_ptr + b * sdb + cols * sdl, mask=col_in, other=-1)
            allowed = allowed & (dq[:, None] == dk[None, :]) & (dq[:, None] >= 0)
        acc = tl.where(allowed, acc, 0.0)
        # (R*BS, R*BS) -> (R, R) block maxima: row r*BS + i of acc is (block r, offset i)
        m = tl.max(tl.max(tl.reshape(acc, (R, BS, R, BS)), axis=3), axis=1) * factor
        # Blocks above the diagonal hold 0 (the map's initial value); blocks past nb do not exist.
        nb = tl.cdiv(L, BS)
        bi = SI * R + tl.arange(0, R).to(tl.int64)
        bj = SJ * R + tl.arange(0, R).to(tl.int64)
        dst = map_ptr + b * smb + bi[:, None] * smi + bj[None, :] * smj
        tl.store(dst, m, mask=(bi[:, None] < nb) & (bj[None, :] < nb))


# --------------------------------------------------------------------------- launch config
# Launch config when none is given: on the H200 (Triton 3.6, bf16, D=128) R=2 with 8 warps (two
# warpgroups on a 128x128 fp32 accumulator) was the fastest or within 5% of it at every context from 8K to
# 131K, MHA and GQA, among R in {1, 2}, 4/8/16 warps and the nested or flat (one pipelined loop over query
# heads) head loop (results/h200-kernels/kernels/block_scores_tuning.csv, workflows/scripts/
# bench_block_scores_tuning.py). R=4 spills registers. For D > 128, LARGE_D_CONFIG keeps one block per
# program and 2 stages to stay inside shared memory. Nsight Compute (block_scores_ncu.csv) shows why no
# config gains more: one program per SM, its warps waiting at barriers.
DEFAULT_CONFIG = {"R": 2, "num_warps": 8, "num_stages": 3, "flat": 0, "lookahead": 0}
LARGE_D_CONFIG = {"R": 1, "num_warps": 8, "num_stages": 2, "flat": 0, "lookahead": 0}
CONFIG_CHOICES = {
    "R": (1, 2, 4),
    "num_warps": (1, 2, 4, 8, 16),
    "num_stages": (1, 2, 3, 4, 5),
    "flat": (0, 1),
    "lookahead": (0, 1),
}


def default_config(D: int) -> dict:
    """The launch config used for head dim D when none is given."""
    return {**DEFAULT_CONFIG, **(LARGE_D_CONFIG if D > 128 else {})}


def _resolve_config(config, D):
    """``config`` (None, or a dict with some of R / num_warps / num_stages) -> a full, checked config."""
    if config is None:
        return default_config(D)
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict with keys {sorted(CONFIG_CHOICES)} or None; got {config!r}")
    unknown = sorted(set(config) - set(CONFIG_CHOICES))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed keys: {sorted(CONFIG_CHOICES)}")
    cfg = {**default_config(D), **config}  # missing keys take the default
    for key, choices in CONFIG_CHOICES.items():
        if type(cfg[key]) is not int or cfg[key] not in choices:
            raise ValueError(f"config[{key!r}]={cfg[key]!r} not allowed; choose one of {choices}")
    if cfg["lookahead"] and not cfg["flat"]:
        raise ValueError("config lookahead=1 pipelines the flat head loop: set flat=1 too")
    return cfg


# --------------------------------------------------------------------------- launcher
def _launch_block_scores(q, k, doc_ids, bmap, scale, block_size, config=None):
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    cfg = _resolve_config(config, D)
    R = cfg["R"]
    nb = bmap.shape[1]
    nsb = -(-nb // R)  # super-blocks of R blocks
    n_tiles = nsb * (nsb + 1) // 2
    if n_tiles == 0 or B == 0:
        return
    if n_tiles >= 2**31 or B >= 2**16:
        raise ValueError(f"too many tiles for one launch: nb={nb} (L={L}, block_size={block_size}, R={R}), B={B}")
    has_doc = doc_ids is not None
    doc = doc_ids if has_doc else bmap  # dummy pointer, never read when HAS_DOC=False
    sdb, sdl = (doc_ids.stride(0), doc_ids.stride(1)) if has_doc else (0, 0)
    precision = "ieee" if q.dtype == torch.float32 else None  # exact fp32; 16-bit: backend default
    _block_scores_kernel[(n_tiles, B)](
        q,
        k,
        doc,
        bmap,
        L,
        Hkv,
        abs(scale) / Hq,
        *q.stride(),
        *k.stride(),
        sdb,
        sdl,
        *bmap.stride(),
        GROUP=Hq // Hkv,
        BS=block_size,
        R=R,
        D=D,
        HAS_DOC=has_doc,
        NEG=scale < 0,
        PRECISION=precision,
        FLAT=bool(cfg["flat"]),
        STAGES=cfg["num_stages"],
        LOOKAHEAD=bool(cfg["lookahead"]),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


# --------------------------------------------------------------------------- public
@torch.no_grad()
def block_scores(q, k, block_size=64, scale=None, doc_ids=None, return_map=True, *, config=None):
    """Triton block scores. Returns (map (B, nb, nb) fp32 or None, column sums (B, nb) fp32).

    q (B, Hq, L, D), k (B, Hkv, L, D) in any float dtype (may be non-contiguous);
    D and block_size must be powers of two >= 16. Memory: O(B * nb^2) floats.
    ``config``: launch config, a dict with some of the keys R (a program covers R x R
    blocks), num_warps, num_stages, flat (1: one software-pipelined loop over query heads) and
    lookahead (1: in that loop, the next head's product issued before this head's epilogue); see
    CONFIG_CHOICES; None or missing keys take ``default_config(D)``. It changes speed, and the result only by rounding.
    Needs Triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU); use
    ``block_scores_torch`` elsewhere.
    """
    B, Hq, Hkv, L, D, g = _check_inputs(q, k, block_size, doc_ids)
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim D={D} must be a power of two >= 16 for the Triton kernel")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two >= 16 for the Triton kernel")
    scale = _default_scale(D, scale)
    if not _HAS_TRITON or (not q.is_cuda and not _interpreter_on()):
        raise RuntimeError(
            "the Triton block-score kernel needs triton and CUDA tensors (or TRITON_INTERPRET=1); "
            "use block_scores_torch or LeMoConfig(kernels='torch')"
        )
    if q.dtype != k.dtype:
        dt = torch.promote_types(q.dtype, k.dtype)
        q, k = q.to(dt), k.to(dt)
    if q.dtype == torch.float64:  # tl.dot has no fp64 path on tensor cores
        q, k = q.float(), k.float()
    nb = -(-L // block_size)
    bmap = torch.zeros(B, nb, nb, dtype=torch.float32, device=q.device)
    _launch_block_scores(q, k, doc_ids, bmap, scale, block_size, config)
    colsum = bmap.sum(dim=1)
    return (bmap if return_map else None), colsum
