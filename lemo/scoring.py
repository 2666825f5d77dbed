"""Scoring: how informative each key block is, for one layer and its current input.

The oracle scorer (the paper's Eq. 1-2) computes the layer's real queries and keys for every token,
then block scores: positive-only, head-averaged Q.K^T, max over each 64x64 tile, column sums over
the causal query blocks. It runs without autograd and never forms an L x L matrix (Triton kernel
on CUDA, segmented torch elsewhere). Scorers are pluggable: anything with `__call__(parts, hidden,
position_embeddings, layout, block_size) -> (B, nb) scores` can replace the oracle.
"""

from __future__ import annotations

import torch

from .kernels.block_scores import block_scores, block_scores_torch
from .layout import TokenLayout
from .models.adapters import LayerParts
from .rope import apply_rope


def project_qk(parts: LayerParts, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE queries and keys of every token: (B, Hq, L, hd), (B, Hkv, L, hd)."""
    b, length, _ = hidden.shape
    h = parts.attn_norm(hidden)
    q = parts.q_proj(h).view(b, length, parts.num_heads, parts.head_dim)
    k = parts.k_proj(h).view(b, length, parts.num_kv_heads, parts.head_dim)
    if parts.rope:
        cos, sin = position_embeddings  # (B or 1, L, hd)
        q = apply_rope(q, cos[:, :, None, :], sin[:, :, None, :])
        k = apply_rope(k, cos[:, :, None, :], sin[:, :, None, :])
    return q.transpose(1, 2), k.transpose(1, 2)


class OracleScorer:
    """Real attention block scores (the paper's definition); `kernels` picks Triton or torch."""

    name = "oracle"

    def __init__(self, kernels: str = "auto"):
        self.kernels = kernels

    def _impl(self, device: torch.device):
        if self.kernels == "torch" or (self.kernels == "auto" and device.type != "cuda"):
            return block_scores_torch
        return block_scores  # raises clearly when Triton cannot run here

    @torch.no_grad()
    def block_map(
        self,
        parts: LayerParts,
        hidden: torch.Tensor,
        position_embeddings,
        layout: TokenLayout,
        block_size: int,
        return_map: bool = True,
    ):
        """(map (B, nb, nb) fp32 or None, key-block scores (B, nb)) from the layer's real q, k."""
        q, k = project_qk(parts, hidden, position_embeddings)
        # Under autocast with fp32 weights, RoPE's fp32 tables promote q, k to fp32; the layer's attention
        # runs in the autocast dtype, so score in it too (fp32 block scores are several times slower).
        if torch.is_autocast_enabled(q.device.type):
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k = q.to(dtype), k.to(dtype)
        doc_ids = None if layout.is_simple else layout.doc_ids
        return self._impl(hidden.device)(
            q, k, block_size=block_size, scale=parts.scaling * parts.q_prescale, doc_ids=doc_ids, return_map=return_map
        )

    def __call__(
        self, parts: LayerParts, hidden: torch.Tensor, position_embeddings, layout: TokenLayout, block_size: int
    ) -> torch.Tensor:
        return self.block_map(parts, hidden, position_embeddings, layout, block_size, return_map=False)[1]
