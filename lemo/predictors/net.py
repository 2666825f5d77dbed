"""The per-layer block predictor: a Q path and a K path, three small linears each, and its block map.

Each path maps one block's head slice (see `blocks.head_blocks`, in = block_size * D / H values)
through  in -> widths[0] -> widths[1] -> head_dim  with ReLU after the first two linears. The first
linear is the low-rank map of the block (rank widths[0]); the two ReLU layers are the elastic part
(units that are mostly zero are pruned during training, `PathMLP.prune`). Weights are shared by all
heads (groups=1) or separate per head (groups=H); shapes (groups, in, out).

Predicted map:  M^[b, I, J] = sum_h <q^[b, I, h], k^[b, J, h]>  on allowed tiles (J <= I, same
document), 0 elsewhere. Scores are the column sums of max(M^, 0) (the oracle's map is positive-only),
so `select_blocks` treats them exactly as the oracle's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import allowed_tiles, head_blocks


class PathMLP(nn.Module):
    """Three linears with ReLU: (N, H, in) -> (N, H, out); tracks how often each hidden unit is zero."""

    def __init__(self, in_features: int, widths: tuple[int, ...], out_features: int, groups: int = 1):
        super().__init__()
        sizes = [in_features, *widths, out_features]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(groups, a, b)) for a, b in zip(sizes, sizes[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(groups, b)) for b in sizes[1:])
        for w, b in zip(self.weights, self.biases):  # nn.Linear's default initialisation
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        self.tracking = False
        self._reset_counts()

    @property
    def widths(self) -> list[int]:
        return [w.shape[2] for w in self.weights[:-1]]

    def _reset_counts(self):
        dev = self.weights[0].device
        self.zero_counts = [torch.zeros(n, dtype=torch.float64, device=dev) for n in self.widths]
        self.samples = 0

    def zero_frequency(self) -> list[torch.Tensor]:
        """Per hidden layer: fraction of tracked samples in which each unit's ReLU output was 0."""
        return [c / max(self.samples, 1) for c in self.zero_counts]

    @staticmethod
    def _linear(x, w, b):
        if w.shape[0] == 1:
            return torch.addmm(b[0], x.reshape(-1, w.shape[1]), w[0]).view(*x.shape[:-1], w.shape[2])
        return torch.baddbmm(b[:, None, :], x.transpose(0, 1), w).transpose(0, 1)  # x (N, H, in), w (H, in, out)

    def forward(self, x: torch.Tensor, hidden: list | None = None) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = self._linear(x, w, b)
            if i < last:
                x = torch.relu(x)
                if self.tracking:
                    with torch.no_grad():
                        zeros = (x == 0).reshape(-1, x.shape[-1]).sum(0).double()
                        self.zero_counts[i] = self.zero_counts[i].to(zeros.device) + zeros
                if hidden is not None:
                    hidden.append(x)
        if self.tracking:
            self.samples += x.numel() // x.shape[-1]
        return x

    @torch.no_grad()
    def prune(self, layer: int, keep: torch.Tensor) -> list[tuple[nn.Parameter, nn.Parameter, int, torch.Tensor]]:
        """Keep only hidden units `keep` of hidden layer `layer`; returns (old, new, dim, index) per parameter."""
        keep = keep.to(self.weights[layer].device).sort().values
        changes = []

        def replace(plist, i, dim):
            old = plist[i]
            new = nn.Parameter(old.index_select(dim, keep).contiguous(), requires_grad=old.requires_grad)
            plist[i] = new
            changes.append((old, new, dim, keep))

        replace(self.weights, layer, 2)
        replace(self.biases, layer, 1)
        replace(self.weights, layer + 1, 1)
        self.zero_counts[layer] = self.zero_counts[layer].to(keep.device)[keep]
        return changes


class LayerPredictor(nn.Module):
    """Predicts one sparse layer's oracle block map from the post-norm hidden state."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        slice_dim: int,
        block_size: int = 64,
        widths: tuple[int, int] = (128, 64),
        per_head: bool = False,
        k_widths: tuple[int, int] | None = None,
    ):
        super().__init__()
        k_widths = widths if k_widths is None else k_widths  # pruning shrinks each path on its own
        for w in (widths, k_widths):
            if len(w) != 2 or min(w) < 1:
                raise ValueError(f"widths must be two positive ints (the two ReLU layers), got {w}")
        self.num_heads, self.head_dim, self.slice_dim, self.block_size = num_heads, head_dim, slice_dim, block_size
        groups = num_heads if per_head else 1
        in_features = block_size * slice_dim
        self.q = PathMLP(in_features, tuple(widths), head_dim, groups)
        self.k = PathMLP(in_features, tuple(k_widths), head_dim, groups)

    @property
    def per_head(self) -> bool:
        return self.q.weights[0].shape[0] > 1

    def head_vectors(self, normed: torch.Tensor, doc_ids: torch.Tensor | None = None):
        """(q^, k^), each (B, nb, H * head_dim), in the predictor's dtype."""
        dtype = self.q.weights[0].dtype
        x = head_blocks(normed.to(dtype), self.block_size, self.num_heads, doc_ids)
        b, nb, h, n = x.shape
        x = x.view(b * nb, h, n)
        return self.q(x).reshape(b, nb, -1), self.k(x).reshape(b, nb, -1)

    def block_map(
        self, normed: torch.Tensor, doc_ids: torch.Tensor | None = None, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw predicted map (B, nb, nb) fp32: 0 on disallowed tiles, may be negative elsewhere.

        `allowed` (from `allowed_tiles`) may be passed when the caller already has it."""
        q, k = self.head_vectors(normed, doc_ids)
        m = torch.bmm(q, k.transpose(1, 2)).float()
        if allowed is None:
            allowed = allowed_tiles(normed.shape[1], self.block_size, normed.device, doc_ids)
        return m.masked_fill(~allowed, 0.0)

    def scores(self, normed: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Key-block scores (B, nb) fp32: column sums of the positive part of the predicted map."""
        return self.block_map(normed, doc_ids).clamp_(min=0).sum(dim=1)

    def widths(self) -> dict[str, list[int]]:
        return {"q": self.q.widths, "k": self.k.widths}


def parameter_count(num_heads: int, head_dim: int, slice_dim: int, block_size: int, widths, per_head=False) -> int:
    """Parameters of one LayerPredictor (both paths)."""
    sizes = [block_size * slice_dim, *widths, head_dim]
    per_path = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    return 2 * per_path * (num_heads if per_head else 1)
