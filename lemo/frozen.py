"""Frozen updates: eliminated tokens still receive a sparse layer's update, computed without gradient.

The paper's elimination lets an eliminated token skip the layer: its hidden state passes through
unchanged. On a real pretrained model that is a large forward perturbation (a token that skips
attention in many layers arrives at the head far from where the model expects it; see the fidelity
diagnostics), so the loss, and the gradient, are those of a different network. Here the eliminated
tokens are *computed* but not *differentiated*: their attention (and, in token MLP mode, MLP) update
is formed under no_grad and added to the residual stream as a constant. Nothing of theirs is saved for
backward, so activation memory is that of plain elimination; the forward stays close to the dense
one; backward flows through the residual stream at eliminated rows and through the kept tokens' own
computation, like the MLP channel trick's "dense forward, sparse backward".

Which keys an eliminated query sees (`keys`): "local" = the kept tokens plus its own 64-token block
(a sparse pattern of global kept blocks + a local block, as the kept queries see kept blocks);
"all" = every earlier token (the exact dense update).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .models.adapters import LayerParts
from .rope import apply_rope

KEYS = ("local", "all")
# Queries per attention call: bounds the boolean mask (chunk x keys) and the score tiles of the
# memory-efficient kernel; the update is transient (no_grad), so only its peak matters.
QUERY_CHUNK = 4096


def _rope(parts: LayerParts, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rope(x, cos[:, None, :], sin[:, None, :]) if parts.rope else x


@torch.no_grad()
def frozen_rows(
    parts: LayerParts,
    flat: torch.Tensor,
    eliminated: torch.Tensor,
    kept: torch.Tensor,
    doc_ids: torch.Tensor,
    position_embeddings,
    block_size: int,
    keys: str,
    mlp: bool,
) -> torch.Tensor:
    """The layer's update at the eliminated rows: (E, D), no autograd history.

    flat (B*L, D) the layer input; eliminated / kept (E,), (K,) sorted indices into it; doc_ids (B, L)
    (-1 = padding); position_embeddings the layer's (cos, sin), (1 or B, L, hd)."""
    if keys not in KEYS:
        raise ValueError(f"frozen keys must be one of {KEYS}, got {keys!r}")
    b, length = doc_ids.shape
    out = flat.new_empty(eliminated.numel(), flat.shape[1])
    if not eliminated.numel():
        return out
    if parts.rope:
        cos, sin = position_embeddings
        cos = cos.expand(b, length, cos.shape[-1]).reshape(b * length, -1)
        sin = sin.expand(b, length, sin.shape[-1]).reshape(b * length, -1)
    else:
        cos = sin = None
    doc = doc_ids.reshape(-1)
    row_of = eliminated // length
    row_of_kept = kept // length
    done = 0
    for row in row_of.unique().tolist():
        q_idx = eliminated[row_of == row]
        if keys == "all":
            k_idx = torch.arange(row * length, (row + 1) * length, device=flat.device)
            k_idx = k_idx[doc[k_idx] >= 0]
        else:
            k_idx = kept[row_of_kept == row]
        k_row, v_row = _keys_values(parts, flat, k_idx, cos, sin)  # once per row, shared by its query chunks
        for start in range(0, q_idx.numel(), QUERY_CHUNK):
            qi = q_idx[start : start + QUERY_CHUNK]
            q, k_own, v_own = _queries(parts, flat, qi, cos, sin, own_keys=keys == "local")
            if keys == "local":  # the chunk's own eliminated tokens join the keys, for their own block only
                ki, k, v = torch.cat([k_idx, qi]), torch.cat([k_row, k_own]), torch.cat([v_row, v_own])
            else:
                ki, k, v = k_idx, k_row, v_row
            out[done : done + qi.numel()] = _attend(
                parts, q, k, v, qi, ki, doc, block_size, keys, k_idx.numel(), length
            )
            done += qi.numel()
    if mlp:
        mid = flat.index_select(0, eliminated) + out
        out += parts.mlp(parts.mlp_norm(mid))
    return out


def _keys_values(parts: LayerParts, flat, idx, cos, sin):
    """Post-RoPE keys and values of rows `idx`: (n, Hkv, hd) each."""
    h = parts.attn_norm(flat.index_select(0, idx))
    k = parts.k_proj(h).view(idx.numel(), parts.num_kv_heads, parts.head_dim)
    v = parts.v_proj(h).view(idx.numel(), parts.num_kv_heads, parts.head_dim)
    if parts.rope:
        k = _rope(parts, k, cos.index_select(0, idx), sin.index_select(0, idx))
    return k, v


def _queries(parts: LayerParts, flat, idx, cos, sin, own_keys: bool):
    """Post-RoPE queries of rows `idx` (n, Hq, hd), and their own keys and values when asked."""
    h = parts.attn_norm(flat.index_select(0, idx))
    q = parts.q_proj(h)
    if parts.q_prescale != 1.0:
        q = q * parts.q_prescale
    q = q.view(idx.numel(), parts.num_heads, parts.head_dim)
    k = v = None
    if own_keys:
        k = parts.k_proj(h).view(idx.numel(), parts.num_kv_heads, parts.head_dim)
        v = parts.v_proj(h).view(idx.numel(), parts.num_kv_heads, parts.head_dim)
    if parts.rope:
        c, sn = cos.index_select(0, idx), sin.index_select(0, idx)
        q = _rope(parts, q, c, sn)
        k = _rope(parts, k, c, sn) if own_keys else None
    return q, k, v


def _attend(parts: LayerParts, q, k, v, qi, ki, doc, block_size: int, keys: str, n_global: int, length: int):
    """o_proj(attention of queries qi over keys ki) with the causal / document / block mask: (n, D)."""
    # token i sees token j when j <= i in the same document; "local" keys past the kept ones only
    # within i's own block
    mask = (ki[None, :] <= qi[:, None]) & (doc[ki][None, :] == doc[qi][:, None])
    if keys == "local":
        own = torch.zeros_like(mask)
        # one row per call, so blocks are compared by position within the row
        own[:, n_global:] = (ki[None, n_global:] % length // block_size) == (qi[:, None] % length // block_size)
        mask &= own | (torch.arange(ki.numel(), device=ki.device) < n_global)[None, :]
    q, k, v = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, H, n, hd)
    groups = parts.num_heads // parts.num_kv_heads
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # a boolean mask rules out the flash backend (which the caller may have forced): allow those that take one
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=parts.scaling)
    o = o[0].transpose(0, 1).reshape(qi.numel(), -1)  # (n, Hq * hd)
    return parts.o_proj(o)
