"""Selection: from key-block scores to the tokens a sparse layer keeps.

Whole blocks are kept (the paper keeps 64-token blocks): the top ceil(keep_ratio * blocks) by score,
or those whose score is at least `threshold` times the layer's mean block score (the paper's tuned
per-layer thresholds start from that mean). Kept indices come out in original order, so causal
attention among the kept tokens is causal in the original sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """Kept tokens of one sparse layer, flattened over the batch (row-major, original order)."""

    index: torch.Tensor  # (T,) int64 into the flattened (B*L) tokens
    lengths: torch.Tensor  # (S,) int64: kept tokens of each attention segment (row x document), in order
    rows: int  # B
    per_row: int | None  # kept tokens per row when every row is one segment of equal length, else None
    kept_blocks: torch.Tensor  # (B, nb) bool
    eliminated: torch.Tensor | None = None  # (E,) int64: the real (non-padding) tokens not kept, in order

    @property
    def total(self) -> int:
        return int(self.index.numel())


def block_valid(valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, nb) bool: blocks holding at least one real token."""
    b, length = valid.shape
    nb = math.ceil(length / block_size)
    padded = torch.zeros(b, nb * block_size, dtype=torch.bool, device=valid.device)
    padded[:, :length] = valid
    return padded.view(b, nb, block_size).any(-1)


def select_blocks(
    scores: torch.Tensor,
    valid_blocks: torch.Tensor,
    *,
    keep_ratio: float = 0.4,
    threshold: float | None = None,
    keep_first: bool = False,
    keep_last: bool = False,
) -> torch.Tensor:
    """(B, nb) bool mask of kept blocks. `threshold` (relative to the row's mean score) replaces top-k."""
    b, nb = scores.shape
    masked = scores.float().masked_fill(~valid_blocks, float("-inf"))
    n_valid = valid_blocks.sum(-1)  # (B,)
    if threshold is None:
        n_keep = torch.clamp((n_valid.double() * keep_ratio).ceil().long(), min=1)
        order = masked.argsort(dim=-1, descending=True, stable=True)  # ties -> earlier block first
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(nb, device=scores.device).expand(b, nb))
        keep = rank < n_keep[:, None]
    else:
        mean = masked.masked_fill(~valid_blocks, 0.0).sum(-1) / n_valid.clamp(min=1)
        keep = masked >= threshold * mean[:, None]
    if keep_first or keep_last:
        idx = torch.arange(nb, device=scores.device).expand(b, nb)
        big = torch.full_like(idx, nb)
        if keep_first:
            first = torch.where(valid_blocks, idx, big).min(-1).values
            keep |= idx == first[:, None]
        if keep_last:
            last = torch.where(valid_blocks, idx, -1).max(-1).values
            keep |= idx == last[:, None]
    return keep & valid_blocks


def tokens_from_blocks(kept_blocks: torch.Tensor, doc_ids: torch.Tensor, block_size: int) -> Selection:
    """Flattened kept-token indices and their attention segments (one per row x document)."""
    b, length = doc_ids.shape
    token_keep = kept_blocks.repeat_interleave(block_size, dim=1)[:, :length] & (doc_ids >= 0)
    index = token_keep.reshape(-1).nonzero().squeeze(1)  # row-major = original order within rows
    eliminated = (~token_keep & (doc_ids >= 0)).reshape(-1).nonzero().squeeze(1)
    # Segment = consecutive kept tokens with the same (row, document).
    row = index // length
    doc = doc_ids.reshape(-1)[index].long()
    key = row * (int(doc_ids.max().item()) + 2 if doc_ids.numel() else 1) + doc
    if index.numel():
        change = torch.ones_like(key, dtype=torch.bool)
        change[1:] = key[1:] != key[:-1]
        starts = change.nonzero().squeeze(1)
        ends = torch.cat([starts[1:], starts.new_tensor([index.numel()])])
        lengths = ends - starts
    else:
        lengths = index.new_zeros(0)
    per_row = None
    if (
        lengths.numel() == b
        and bool((lengths == lengths[0]).all())
        and torch.equal(torch.unique(row), torch.arange(b, device=row.device))
    ):
        per_row = int(lengths[0])
    return Selection(
        index=index, lengths=lengths, rows=b, per_row=per_row, kept_blocks=kept_blocks, eliminated=eliminated
    )
