"""Oracle block scores under sequence parallelism, equal to the single-process scores.

The key-block score of block J is a column sum over query blocks I of the block map
M[I, J] = max over the (I, J) tile of the head-summed P (lemo.kernels.block_scores). The head sum sits
inside the max, so per-rank scores from a head subset do not add up to the true scores (their sum is
an upper bound); the sum over I does split. So each rank scores its own query blocks (all heads: it
holds its tokens' hidden states) against all keys before them, and an all-reduce of the (B, nb) scores
gives every rank the single-process scores and hence the same selection.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..scoring import OracleScorer, project_qk


@torch.no_grad()
def sequence_block_scores(parts, hidden: torch.Tensor, position_embeddings, block_size: int, group=None,
                          kernels: str = "auto") -> torch.Tensor:
    """hidden (B, l, D): this rank's contiguous slice (all slices equal, l a multiple of block_size).
    Returns the (B, nb) key-block scores of the whole sequence, identical on every rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    b, l, _ = hidden.shape
    q, k = project_qk(parts, hidden, position_embeddings)  # RoPE at global positions (from position_ids)
    if torch.is_autocast_enabled(q.device.type):  # as OracleScorer: score in the attention's dtype
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k = q.to(dtype), k.to(dtype)
    keys = [torch.empty_like(k) for _ in range(world)]
    dist.all_gather(keys, k.contiguous(), group=group)
    start, end = rank * l, (rank + 1) * l
    keys = torch.cat(keys[:rank + 1], dim=2)  # causal: queries of this slice see keys [0, end)
    # Query rows before this slice are zero: relu(0) = 0, so their tiles score 0 and add nothing.
    # (They still cost compute in the kernels, which take q and k of one length.)
    rows = q.new_zeros(b, q.shape[1], end, q.shape[-1])
    rows[:, :, start:] = q
    impl = OracleScorer(kernels)._impl(hidden.device)
    _, partial = impl(rows, keys, block_size=block_size, scale=parts.scaling * parts.q_prescale, doc_ids=None,
                      return_map=False)
    scores = partial.new_zeros(b, world * l // block_size)
    scores[:, :partial.shape[1]] = partial
    dist.all_reduce(scores, group=group)
    return scores
