"""Oracle block scores under sequence parallelism, equal to the single-process scores.

The key-block score of block J is a column sum over query blocks I of the block map
M[I, J] = max over the (I, J) tile of the head-summed P (lemo.kernels.block_scores). The head sum sits
inside the max, so per-rank scores from a head subset do not add up to the true scores (their sum is
an upper bound); the sum over I does split. So each rank scores its own query blocks (all heads: it
holds its tokens' hidden states): against its own keys with the layer's kernel (causal within the
slice), and against each earlier rank's keys, sent one slice at a time so that no rank holds more than
one extra slice of keys (every such key precedes every query here: no mask). An all-reduce of the
(B, nb) scores then gives every rank the single-process scores, hence the same selection.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..scoring import OracleScorer, project_qk


@torch.no_grad()
def earlier_key_tile_max(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, query_chunk: int = 512
) -> torch.Tensor:
    """M[I, J] for queries q (B, Hq, lq, D) and keys k (B, Hkv, lk, D) that all precede them, both whole
    blocks: (B, lq / bs, lk / bs) fp32. Same arithmetic as block_scores_torch, without its causal mask."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, bs = hq // hkv, block_size
    qv = q.view(b, hkv, g, lq, d)
    if scale < 0:  # relu(scale * x) = |scale| * relu(-x)
        qv = -qv
    kt = k.transpose(-1, -2)
    out = torch.empty(b, lq // bs, lk // bs, dtype=torch.float32, device=q.device)
    step = max(1, query_chunk // bs) * bs
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        rows = r1 - r0
        acc = torch.zeros(b, rows, lk, dtype=torch.float32, device=q.device)
        for h in range(hkv):  # one KV head and its g query heads per matmul (no GQA copy of k)
            s = torch.matmul(qv[:, h, :, r0:r1].reshape(b, g * rows, d), kt[:, h]).relu_()
            acc += s.view(b, g, rows, lk).sum(dim=1, dtype=torch.float32)
        out[:, r0 // bs : r1 // bs] = acc.view(b, rows // bs, bs, lk // bs, bs).amax(dim=(2, 4)).mul_(abs(scale) / hq)
    return out


@torch.no_grad()
def sequence_block_scores(
    parts, hidden: torch.Tensor, position_embeddings, block_size: int, group=None, kernels: str = "auto"
) -> torch.Tensor:
    """hidden (B, l, D): this rank's contiguous slice (all slices equal, l a multiple of block_size).
    Returns the (B, nb) key-block scores of the whole sequence, identical on every rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    b, length, _ = hidden.shape
    q, k = project_qk(parts, hidden, position_embeddings)  # RoPE at global positions (from position_ids)
    if torch.is_autocast_enabled(q.device.type):  # as OracleScorer: score in the attention's dtype
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k = q.to(dtype), k.to(dtype)
    scale = parts.scaling * parts.q_prescale
    nbl = length // block_size
    scores = torch.zeros(b, world * nbl, dtype=torch.float32, device=hidden.device)
    _, own = OracleScorer(kernels)._impl(hidden.device)(
        q, k, block_size=block_size, scale=scale, doc_ids=None, return_map=False
    )
    scores[:, rank * nbl : (rank + 1) * nbl] = own
    k = k.contiguous()
    for src in range(world - 1):  # the last rank's keys precede no other slice
        keys = k if src == rank else torch.empty_like(k)
        dist.broadcast(keys, src=src if group is None else dist.get_global_rank(group, src), group=group)
        if src < rank:
            scores[:, src * nbl : (src + 1) * nbl] += earlier_key_tile_max(q, keys, block_size, scale).sum(dim=1)
    dist.all_reduce(scores, group=group)
    return scores
