"""Rotary position embedding (rotate-half form, as in Llama/Mistral/Qwen2), applied at given positions."""

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., hd) rotated by cos/sin broadcastable to x; same arithmetic as transformers' apply_rotary_pos_emb."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
