"""Elastic predictor size: drop the hidden units whose ReLU output is most often zero.

While training, each path counts per hidden unit how many (block, head) samples gave a zero ReLU
output. `prune_set` then removes, in every hidden layer of every path, the `fraction` of units with
the highest zero frequency (never going below `min_width`, and only units zero in at least
`min_zero_freq` of the samples), physically shrinking the linears on both sides of the layer. The
optimizer is rebuilt over the new parameters with its per-parameter state (AdamW moments) sliced
the same way, so kept units continue exactly where they were.
"""

from __future__ import annotations

import math

import torch

from .net import PathMLP
from .store import PredictorSet


def units_to_keep(zero_freq: torch.Tensor, fraction: float, min_width: int, min_zero_freq: float = 0.0) -> torch.Tensor:
    """Indices (sorted) of the units kept: all but the `fraction` most-often-zero (ties: earlier unit goes)."""
    width = zero_freq.numel()
    n_drop = min(int(math.floor(fraction * width)), max(0, width - min_width))
    n_drop = min(n_drop, int((zero_freq >= min_zero_freq).sum()))
    if n_drop <= 0:
        return torch.arange(width, device=zero_freq.device)
    order = torch.argsort(zero_freq, descending=True, stable=True)
    return order[n_drop:].sort().values


def prune_path(path: PathMLP, fraction: float, min_width: int, min_zero_freq: float = 0.0) -> list:
    changes = []
    for layer, freq in enumerate(path.zero_frequency()):
        keep = units_to_keep(freq, fraction, min_width, min_zero_freq)
        if keep.numel() < freq.numel():
            changes += path.prune(layer, keep)
    path._reset_counts()
    return changes


def prune_set(predictors: PredictorSet, fraction: float, min_width: int = 8, min_zero_freq: float = 0.0) -> list:
    """Prune every path of every layer; returns the parameter changes (old, new, dim, index)."""
    changes = []
    for p in predictors.predictors.values():
        changes += prune_path(p.q, fraction, min_width, min_zero_freq)
        changes += prune_path(p.k, fraction, min_width, min_zero_freq)
    return changes


def rebuild_optimizer(optimizer: torch.optim.Optimizer, params, changes) -> torch.optim.Optimizer:
    """Point `optimizer` (one param group) at `params`, in place; state carried over, sliced where pruned."""
    replaced = {}  # new param -> (old param, [(dim, index)])
    for old, new, dim, index in changes:
        src, ops = replaced.pop(old, (old, []))  # a parameter pruned twice (both its dims) chains its slices
        replaced[new] = (src, ops + [(dim, index)])
    old_state = optimizer.state
    params = list(params)
    new_state = {}
    for p in params:
        src, ops = replaced.get(p, (p, []))
        if src not in old_state:
            continue
        state = {}
        for key, value in old_state[src].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == src.shape:
                for dim, index in ops:
                    value = value.index_select(dim, index.to(value.device))
            state[key] = value
        new_state[p] = state
    optimizer.param_groups[0]["params"] = params
    optimizer.state.clear()
    optimizer.state.update(new_state)
    return optimizer
