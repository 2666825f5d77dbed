"""Block inputs of a predictor and the block-level attention mask it shares with the oracle.

Reading of the post-norm hidden state (the layer's attn_norm output, (B, L, D)): the hidden dim is
cut into `num_heads` equal slices of width w = D / num_heads (w = head_dim for the Llama family,
where D = num_heads * head_dim). For key/query block I and head h the predictor input is the
block_size * w vector

    x[b, I, h, t * w + c] = normed[b, I * block_size + t, h * w + c],   t < block_size, c < w

(token-major, then the channel within the slice). Tokens past the end (partial last block) and
padding tokens (doc_ids == -1) contribute zeros.

Tile mask: the oracle's map is zero on tiles (I, J) that hold no allowed query/key pair (causal,
same document, not padding). Here that is decided from block contents alone: a diagonal tile is
allowed when its block holds a real token; a tile J < I when both blocks hold a token of one document.
"""

from __future__ import annotations

import torch


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def head_blocks(
    normed: torch.Tensor, block_size: int, num_heads: int, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, L, D) -> (B, nb, H, block_size * D // H), zero-padded; padding tokens zeroed."""
    b, length, d = normed.shape
    if d % num_heads:
        raise ValueError(f"hidden size {d} is not divisible by num_heads={num_heads}")
    w = d // num_heads
    nb = num_blocks(length, block_size)
    if doc_ids is not None:
        normed = normed.masked_fill((doc_ids < 0)[..., None], 0.0)
    pad = nb * block_size - length
    if pad:
        normed = torch.nn.functional.pad(normed, (0, 0, 0, pad))
    x = normed.view(b, nb, block_size, num_heads, w).permute(0, 1, 3, 2, 4)  # (B, nb, H, bs, w)
    return x.reshape(b, nb, num_heads, block_size * w)


def allowed_tiles(length: int, block_size: int, device, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B or 1, nb, nb) bool: tiles (I, J) holding at least one allowed (causal, same-document) pair."""
    nb = num_blocks(length, block_size)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=device).tril()
    if doc_ids is None:
        return causal[None]
    b = doc_ids.shape[0]
    docs = torch.full((b, nb * block_size), -1, dtype=torch.long, device=device)
    docs[:, :length] = doc_ids.long()
    docs = docs.view(b, nb, block_size)
    valid = docs >= 0
    ids, inverse = torch.unique(docs.masked_fill(~valid, -1), return_inverse=True)  # -1 first if present
    presence = torch.zeros(b, nb, ids.numel(), dtype=torch.float32, device=device)
    presence.scatter_(2, inverse, valid.float())  # padding scatters zeros: no presence
    share = torch.bmm(presence, presence.transpose(1, 2)) > 0  # a common document
    strict = torch.ones(nb, nb, dtype=torch.bool, device=device).tril(-1)
    diag = torch.eye(nb, dtype=torch.bool, device=device)
    return (share & strict) | (diag & valid.any(-1)[:, :, None])
