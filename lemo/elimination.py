"""Token elimination: one decoder layer computed on its kept tokens only.

Kept rows are gathered from the flattened hidden state, normalised and projected; RoPE is applied at
their original positions; causal attention runs among kept tokens in original order (the model's own
attention function, so the backend is the one the model uses; ragged batches run per segment); the
output projection is added back into the residual stream at the kept rows. Eliminated tokens pass
through unchanged, and nothing of theirs is saved for backward: index_select and scatter_add_rows keep
only indices, every other saved tensor has kept-token length.

movement="triton" (LeMoConfig.movement_kernel) moves rows with lemo.kernels.movement instead: a fused
selective load + RMSNorm that saves no gathered copy, RoPE read at the original positions from the
full cos/sin tables, and in-place residual adds into the layer's input (or into one clone of it where
the input must survive: under checkpointing, see writable_residual), so no full-length out-of-place
copies of the residual stream are made.

With one selection shared by a run of consecutive sparse layers, `compact_layer` runs those layers on
the kept rows alone (LeMoConfig.compact_stream): the first gathers them from the residual stream, the
last scatters them back into the first one's input, whose eliminated rows they passed through
unchanged. The same function as per-layer gathering and scattering, but the tensors between the layers
(the inputs that gradient checkpointing keeps) hold kept rows only, and no layer moves rows. With
movement="triton" the run's norms are the fused Triton RMSNorm (the first layer's also gathers) and its
RoPE reads the full cos/sin tables at the kept positions: a few kernels a layer instead of the dozens
that torch's norm and RoPE launch on every layer.

With a `Frozen` spec (LeMoConfig.eliminated="frozen") the eliminated tokens also receive the layer's
update, computed without gradient (lemo.frozen), before the MLP reads the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .frozen import frozen_rows
from .kernels.rows import scatter_add_rows
from .models.adapters import LayerParts
from .rope import apply_rope
from .selection import Selection


@dataclass
class Frozen:
    """How eliminated tokens get their no-grad update (lemo.frozen)."""

    keys: str  # "local" or "all"
    doc_ids: torch.Tensor  # (B, L) the batch's layout
    block_size: int


def _frozen_update(parts: LayerParts, flat: torch.Tensor, sel: Selection, position_embeddings, frozen, mlp_mode: str):
    """(E, D) no-grad update of the eliminated rows from the layer input, or None."""
    if frozen is None or sel.eliminated is None or not sel.eliminated.numel():
        return None
    return frozen_rows(
        parts,
        flat,
        sel.eliminated,
        sel.index,
        frozen.doc_ids,
        position_embeddings,
        frozen.block_size,
        frozen.keys,
        mlp=mlp_mode == "token",
    )


def _attention_function(parts: LayerParts):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = parts.attn_module.config._attn_implementation
    if impl == "eager":
        return impl, None
    return impl, ALL_ATTENTION_FUNCTIONS[impl]


def _eager_causal(q, k, v, scaling):
    """Matmul + softmax with an explicit causal mask (HF's eager function takes its mask from outside)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2)  # (B, n, H, hd)


def _attend_batched(parts: LayerParts, q, k, v):
    """q (B, n, Hq, hd), k/v (B, n, Hkv, hd): causal attention, output (B, n, Hq, hd)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    impl, fn = _attention_function(parts)
    if fn is None:
        return _eager_causal(q, k, v, parts.scaling)
    causal = {"is_causal": True} if impl == "sdpa" else {}  # other kernels read module.is_causal
    out, _ = fn(parts.attn_module, q, k, v, None, dropout=0.0, scaling=parts.scaling, **causal)
    return out


def attend_kept(parts: LayerParts, q, k, v, sel: Selection) -> torch.Tensor:
    """Causal attention among kept tokens, segment by segment. q (T, Hq, hd) -> (T, Hq * hd)."""
    t = q.shape[0]
    if sel.per_row is not None:  # equal, unsegmented rows: one batched call
        n = sel.per_row
        out = _attend_batched(
            parts,
            q.view(sel.rows, n, *q.shape[1:]),
            k.view(sel.rows, n, *k.shape[1:]),
            v.view(sel.rows, n, *v.shape[1:]),
        )
        return out.reshape(t, -1)
    sizes = sel.lengths.tolist()
    outs = [
        _attend_batched(parts, qs[None], ks[None], vs[None])[0]
        for qs, ks, vs in zip(q.split(sizes), k.split(sizes), v.split(sizes))
    ]
    return torch.cat(outs).reshape(t, -1)


def gather_positions(position_embeddings, sel: Selection, length: int):
    """cos/sin at the kept tokens' original positions: (T, hd) each."""
    cos, sin = position_embeddings
    hd = cos.shape[-1]
    cos = cos.expand(sel.rows, length, hd).reshape(-1, hd).index_select(0, sel.index)
    sin = sin.expand(sel.rows, length, hd).reshape(-1, hd).index_select(0, sel.index)
    return cos, sin


def kept_rope(position_embeddings, sel: Selection, length: int, movement: str):
    """A function rotating kept rows (T, H, hd) at their original positions: Triton reads the full cos/sin
    tables at sel.index (rows of a (B, length) batch); torch gathers the tables once."""
    if movement == "triton":
        from .kernels import movement as mv

        cos, sin = position_embeddings
        return lambda x: mv.rope_rows(x, cos, sin, sel.index, length)
    cos, sin = gather_positions(position_embeddings, sel, length)
    return lambda x: apply_rope(x, cos[:, None, :], sin[:, None, :])


def _project_attend(parts: LayerParts, h: torch.Tensor, sel: Selection, rope) -> torch.Tensor:
    """Normalised kept rows h (T, D) -> q, k, v; `rope(x)` rotates q and k at their original positions;
    causal attention among the kept tokens; output projection. (T, D)."""
    t = sel.total
    q = parts.q_proj(h)
    if parts.q_prescale != 1.0:
        q = q * parts.q_prescale
    q = q.view(t, parts.num_heads, parts.head_dim)
    k = parts.k_proj(h).view(t, parts.num_kv_heads, parts.head_dim)
    v = parts.v_proj(h).view(t, parts.num_kv_heads, parts.head_dim)
    if parts.rope:
        q, k = rope(q), rope(k)
    return _dropout(parts, parts.o_proj(attend_kept(parts, q, k, v, sel)))


def attention_update(parts: LayerParts, flat: torch.Tensor, sel: Selection, positions) -> torch.Tensor:
    """The attention sub-layer's output for kept rows: (T, D)."""
    cos, sin = positions if parts.rope else (None, None)
    return _project_attend(
        parts,
        parts.attn_norm(flat.index_select(0, sel.index)),
        sel,
        lambda x: apply_rope(x, cos[:, None, :], sin[:, None, :]),
    )


def _dropout(parts: LayerParts, x: torch.Tensor) -> torch.Tensor:
    """Residual dropout (OPT); skipped when p = 0 because dropout(p=0) still saves a mask in training."""
    if parts.dropout == 0.0 or not parts.attn_module.training:
        return x
    return F.dropout(x, p=parts.dropout, training=True)


def sparse_layer(
    parts: LayerParts,
    hidden: torch.Tensor,
    sel: Selection,
    position_embeddings,
    mlp_mode: str,
    movement: str = "torch",
    frozen: Frozen | None = None,
) -> torch.Tensor:
    """hidden (B, L, D) -> (B, L, D) with attention (and, in token mode, the MLP) on kept tokens only."""
    if movement == "triton":
        return _sparse_layer_triton(parts, hidden, sel, position_embeddings, mlp_mode, frozen)
    if movement != "torch":
        raise ValueError(f"movement must be 'torch' or 'triton', got {movement!r}")
    b, length, d = hidden.shape
    flat = hidden.reshape(b * length, d)
    eliminated_update = _frozen_update(parts, flat, sel, position_embeddings, frozen, mlp_mode)
    positions = gather_positions(position_embeddings, sel, length) if parts.rope else None
    if sel.total:
        flat = scatter_add_rows(flat, sel.index, attention_update(parts, flat, sel, positions))
    if eliminated_update is not None:
        flat = scatter_add_rows(flat, sel.eliminated, eliminated_update)
    if mlp_mode == "token":
        if sel.total:
            m = parts.mlp(parts.mlp_norm(flat.index_select(0, sel.index)))
            flat = scatter_add_rows(flat, sel.index, _dropout(parts, m))
    else:  # dense forward on all tokens ("channel" mode patches the MLP's backward)
        m = parts.mlp(parts.mlp_norm(flat))
        flat = flat + _dropout(parts, m)
    return flat.view(b, length, d)


def _attention_update_triton(
    parts: LayerParts, base: torch.Tensor, sel: Selection, position_embeddings, length: int
) -> torch.Tensor:
    """attention_update with fused row movement: load + norm from the full hidden state, RoPE at the
    original positions read from the full cos/sin tables."""
    from .kernels import movement as mv

    cos, sin = position_embeddings if parts.rope else (None, None)
    return _project_attend(
        parts,
        mv.load_norm(parts.attn_norm, base, sel.index),
        sel,
        lambda x: mv.rope_rows(x, cos, sin, sel.index, length),
    )


def _sparse_layer_triton(
    parts: LayerParts,
    hidden: torch.Tensor,
    sel: Selection,
    position_embeddings,
    mlp_mode: str,
    frozen: Frozen | None = None,
) -> torch.Tensor:
    from .kernels import movement as mv

    length = hidden.shape[1]
    eliminated_update = _frozen_update(
        parts, hidden.reshape(-1, hidden.shape[-1]), sel, position_embeddings, frozen, mlp_mode
    )
    base = mv.writable_residual(hidden)  # the input itself, or one clone where it must survive
    if sel.total:
        base = mv.add_rows_(base, sel.index, _attention_update_triton(parts, base, sel, position_embeddings, length))
    if eliminated_update is not None:
        base = mv.add_rows_(base, sel.eliminated, eliminated_update)
    if mlp_mode == "token":
        if sel.total:
            m = parts.mlp(mv.load_norm(parts.mlp_norm, base, sel.index))
            base = mv.add_rows_(base, sel.index, _dropout(parts, m))
        return base
    # dense MLP forward on all tokens: its norm saves `base`, so this add stays out of place
    return base + _dropout(parts, parts.mlp(parts.mlp_norm(base)))


def compact_layer(
    parts: LayerParts,
    hidden: torch.Tensor,
    sel: Selection,
    rope,
    gather: bool,
    scatter_into: torch.Tensor | None = None,
    movement: str = "torch",
) -> torch.Tensor:
    """One layer of a compact residual stream (module docstring). `hidden` is the full (B, L, D) stream
    when `gather` (the run's first layer), else the kept rows (1, T, D); `rope` rotates kept rows at their
    positions (kept_rope). With `scatter_into` (the run's first input, (B, L, D)) the kept rows are written
    back into a copy of it and the full stream returned; else (1, T, D)."""
    d = hidden.shape[-1]
    flat = hidden.reshape(-1, d)
    if movement == "triton":
        from .kernels import movement as mv

        rows = torch.arange(sel.total, device=flat.device)
        h = mv.load_norm(parts.attn_norm, flat, sel.index if gather else rows)  # gathers in the first layer
        if gather:
            flat = flat.index_select(0, sel.index)
        flat = flat + _project_attend(parts, h, sel, rope)
        flat = flat + _dropout(parts, parts.mlp(mv.load_norm(parts.mlp_norm, flat, rows)))
    else:
        if gather:
            flat = flat.index_select(0, sel.index)
        flat = flat + _project_attend(parts, parts.attn_norm(flat), sel, rope)
        flat = flat + _dropout(parts, parts.mlp(parts.mlp_norm(flat)))
    if scatter_into is None:
        return flat.view(1, sel.total, d)
    return with_kept_rows(scatter_into, sel, flat)


def with_kept_rows(full: torch.Tensor, sel: Selection, rows: torch.Tensor) -> torch.Tensor:
    """A copy of the full stream `full` (B, L, D) with its kept rows replaced by `rows` (T, D) or (1, T, D);
    backward keeps the index only."""
    d = full.shape[-1]
    return full.reshape(-1, d).index_copy(0, sel.index, rows.reshape(-1, d)).view(full.shape)
