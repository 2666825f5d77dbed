"""Ulysses all-to-alls between a sequence slice (all heads) and the whole sequence (a head group).

Uneven slices are allowed (kept tokens per rank differ): `counts[r]` rows live on rank r. Slices are
contiguous and in rank order, so concatenating what each rank sends gives the original token order.
torch's functional `all_to_all_single_autograd` carries gradients (its backward is the inverse all-to-all),
so autograd flows across ranks (torch.distributed.nn.functional.all_to_all_single is deprecated for it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor


def _all_to_all(x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group) -> torch.Tensor:
    out = all_to_all_single_autograd(x.contiguous(), out_sizes, in_sizes, group or dist.group.WORLD)
    return wait_tensor(out)


def seq_to_heads(x: torch.Tensor, counts: list[int], group=None) -> torch.Tensor:
    """x (n, W, G, hd): this rank's n tokens, heads split into W groups of G -> (sum(counts), G, hd):
    every rank's tokens for head group `rank`."""
    n, world, heads, hd = x.shape
    send = x.transpose(0, 1).reshape(world * n, heads, hd)  # chunk j (n rows) goes to rank j
    return _all_to_all(send, list(counts), [n] * world, group)


def heads_to_seq(y: torch.Tensor, counts: list[int], group=None) -> torch.Tensor:
    """Inverse of seq_to_heads: y (sum(counts), G, hd) -> (n, W, G, hd) with n = counts[rank]."""
    world = len(counts)
    n = counts[dist.get_rank(group)]
    _, heads, hd = y.shape
    out = _all_to_all(y, [n] * world, list(counts), group)
    return out.view(world, n, heads, hd).transpose(0, 1)
