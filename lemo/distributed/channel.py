"""Channel-mode MLP ranking over every rank's tokens.

LeMo's channel mode (lemo.mlp) keeps the top intermediate channels of each MLP call, ranked by norms over
all tokens of that call. Split over ranks (data parallel: other sequences; sequence parallel: other
slices), each rank would rank its own tokens and pick other channels than one process on the whole
batch. Summing the squared norms over the group (2 x intermediate floats per MLP call) restores the
single-process ranking.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ..apply import DenseFallback
from ..mlp import channel_pruned_forward
from ..models.adapters import unwrap


def _all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    dist.all_reduce(tensor, group=group)
    return tensor


def rank_channels_globally(model, group=None) -> int:
    """Re-point LeMo's channel-pruned MLP forwards at a group-wide ranking; returns how many (0 when
    LeMo is absent or not in channel mode). remove_lemo restores the MLPs as before."""
    handle = getattr(unwrap(model), "_lemo", None)
    if handle is None:
        return 0
    n = 0
    for module, _ in handle.patched:  # (module, the forward it had before LeMo)
        forward = module.__dict__.get("forward")
        forward = forward.lemo if isinstance(forward, DenseFallback) else forward
        if isinstance(forward, functools.partial) and forward.func is channel_pruned_forward:
            # Without the dense fallback (LeMoConfig.min_sparse_tokens): the ranking is a collective in every
            # MLP call, which a rank with a short batch must not skip while another rank runs it.
            module.forward = functools.partial(
                channel_pruned_forward,
                module,
                handle.config.mlp_keep_channels,
                active_in_eval=handle.config.active_in_eval,
                reduce=functools.partial(_all_reduce, group=group),
            )
            n += 1
    return n
