"""Which tokens exist and which may attend to which: padding and packed documents.

A batch row holds one sequence, a padded one, or several packed documents (position ids restarting
at 0). `doc_ids` encodes all three: token i may attend to token j (j <= i) only when both carry the
same document id; padding carries -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLayout:
    doc_ids: torch.Tensor  # (B, L) int32, -1 = padding

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.doc_ids.shape)

    @property
    def valid(self) -> torch.Tensor:  # (B, L) bool
        return self.doc_ids >= 0

    @property
    def is_simple(self) -> bool:
        """One document per row and no padding: attention is plain causal over each row."""
        return bool((self.doc_ids == 0).all())


def make_layout(
    batch: int,
    length: int,
    device,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> TokenLayout:
    """Layout from the model's 2D padding mask (1 = token) and position ids (restarts = new document)."""
    doc = torch.zeros(batch, length, dtype=torch.int32, device=device)
    if position_ids is not None and position_ids.shape[-1] == length and length > 1:
        pos = position_ids.expand(batch, length).to(device)
        starts = torch.zeros_like(pos, dtype=torch.int32)
        starts[:, 1:] = (pos[:, 1:] <= pos[:, :-1]).int()  # a position that does not grow starts a document
        doc = torch.cumsum(starts, dim=1, dtype=torch.int32)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"LeMo needs a 2D (batch, length) padding mask, got shape {tuple(attention_mask.shape)}")
        doc = torch.where(attention_mask.to(device).bool(), doc, torch.full_like(doc, -1))
    return TokenLayout(doc)
