"""Ulysses sequence parallelism for LeMo (Llama family, batch 1, length divisible by world x block size).

Each rank holds a contiguous slice of the sequence through the embeddings, norms, MLPs and the loss.
In every decoder layer:

1. scoring (no autograd, lemo.distributed.sp_scoring): per-rank query-block scores, all-reduced, so
   every rank has the single-process (B, nb) scores;
2. selection: lemo.selection.select_blocks on those scores, the same on every rank;
3. attention: each rank projects q, k, v for its kept tokens; one all-to-all gives each rank every
   kept token for Hq/W query heads and their Hkv/W KV heads; causal attention among them with the
   model's attention function (lemo.elimination.attend_kept); the inverse all-to-all brings each rank
   its tokens for all heads back for o_proj, then the MLP runs on this rank's rows.

Layers LeMo leaves dense run the same path with every block kept (a plain HF layer would attend within
its slice only). Selection happens outside the checkpointed function, as in LeMoLayer, so
recomputation re-runs the all-to-alls but never re-scores. Parameters are replicated: the loss of each
rank is its share of the global mean, and `sync_gradients` sums gradients over the group.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from ..apply import LeMoLayer
from ..elimination import attend_kept, gather_positions
from ..kernels.rows import scatter_add_rows
from ..models.adapters import get_adapter, unwrap
from ..rope import apply_rope
from ..segment_loss import IGNORE_INDEX, SegmentedCrossEntropy, shift_labels
from ..selection import Selection, select_blocks, tokens_from_blocks
from . import sp_scoring
from .channel import rank_channels_globally
from .ulysses import heads_to_seq, seq_to_heads


@dataclass
class SequenceSelection:
    """Blocks kept in one layer: global (same on every rank) and this rank's share."""

    kept_blocks: torch.Tensor  # (1, nb) bool over the whole sequence
    local: Selection  # this rank's kept tokens (indices into its slice)
    counts: list  # kept tokens per rank, in rank order

    @property
    def total(self) -> int:
        return sum(self.counts)


def local_selection(kept: torch.Tensor, rank: int, world: int, block_size: int) -> SequenceSelection:
    nb_local = kept.shape[1] // world
    counts = [int(kept[:, r * nb_local : (r + 1) * nb_local].sum()) * block_size for r in range(world)]
    mine = kept[:, rank * nb_local : (rank + 1) * nb_local]
    docs = torch.zeros(1, nb_local * block_size, dtype=torch.int32, device=kept.device)
    return SequenceSelection(kept, tokens_from_blocks(mine, docs, block_size), counts)


def sequence_parallel_layer(
    parts, hidden: torch.Tensor, sel: SequenceSelection, position_embeddings, mlp_mode: str, group=None
) -> torch.Tensor:
    """lemo.elimination.sparse_layer with attention across ranks. hidden (1, l, D) -> (1, l, D)."""
    _, length, d = hidden.shape
    world = dist.get_world_size(group)
    flat = hidden.reshape(length, d)
    local = sel.local
    n, hq, hkv, hd = local.total, parts.num_heads, parts.num_kv_heads, parts.head_dim
    cos, sin = gather_positions(position_embeddings, local, length)
    h = parts.attn_norm(flat.index_select(0, local.index))
    q = apply_rope(parts.q_proj(h).view(n, hq, hd), cos[:, None, :], sin[:, None, :])
    k = apply_rope(parts.k_proj(h).view(n, hkv, hd), cos[:, None, :], sin[:, None, :])
    v = parts.v_proj(h).view(n, hkv, hd)
    # One all-to-all for q, k, v: per destination rank, its query heads then its KV heads (one collective
    # instead of three also keeps the backward's collective order trivially the same on every rank).
    qg, kg = hq // world, hkv // world
    packed = torch.cat([q.view(n, world, qg, hd), k.view(n, world, kg, hd), v.view(n, world, kg, hd)], dim=2)
    q, k, v = seq_to_heads(packed, sel.counts, group).split([qg, kg, kg], dim=1)
    total = sel.total
    whole = Selection(
        index=local.index.new_empty(0),
        lengths=local.index.new_tensor([total]),
        rows=1,
        per_row=total,
        kept_blocks=sel.kept_blocks,
    )  # batch 1: one causal segment
    out = attend_kept(parts, q, k, v, whole).view(total, qg, hd)
    out = heads_to_seq(out, sel.counts, group).reshape(n, hq * hd)
    flat = scatter_add_rows(flat, local.index, parts.o_proj(out))
    if mlp_mode == "token":
        m = parts.mlp(parts.mlp_norm(flat.index_select(0, local.index)))
        flat = scatter_add_rows(flat, local.index, m)
    else:  # "dense" and "channel" (the MLP module's patched backward does the channel pruning)
        flat = flat + parts.mlp(parts.mlp_norm(flat))
    return flat.view(1, length, d)


class SequenceParallelLayer(LeMoLayer):
    """A LeMoLayer whose selection and attention span the ranks of `group`. `dense`: keep every block."""

    group = None
    dense = False

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if not self._active():
            raise ValueError("sequence-parallel LeMo layers are for training; evaluate the unsharded model")
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise ValueError("sequence-parallel LeMo layers do not fill a KV cache; pass use_cache=False")
        parts = self.adapter.parts(self)
        position_embeddings = kwargs.get("position_embeddings")
        sel = self.select(parts, hidden_states, position_embeddings)
        mlp_mode = "dense" if self.dense else self.config.mlp_mode
        run = functools.partial(
            sequence_parallel_layer,
            parts,
            sel=sel,
            position_embeddings=position_embeddings,
            mlp_mode=mlp_mode,
            group=self.group,
        )
        if self.gradient_checkpointing and torch.is_grad_enabled():
            ckpt = getattr(self, "_gradient_checkpointing_func", None) or functools.partial(
                checkpoint, use_reentrant=False
            )
            return ckpt(run, hidden_states)
        return run(hidden_states)

    @torch.no_grad()
    def select(self, parts, hidden: torch.Tensor, position_embeddings) -> SequenceSelection:
        cfg = self.config
        b, length, _ = hidden.shape
        if b != 1 or length % cfg.block_size or self.state.attention_mask is not None:
            raise ValueError(
                f"sequence parallelism takes batch 1, no padding mask, and a slice that is whole "
                f"blocks (got batch {b}, slice {length}, block size {cfg.block_size})"
            )
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        valid = torch.ones(1, world * length // cfg.block_size, dtype=torch.bool, device=hidden.device)
        if self.dense or (cfg.selection == "topk" and cfg.keep_ratio >= 1.0):
            kept = valid
        else:
            scores = sp_scoring.sequence_block_scores(
                parts, hidden, position_embeddings, cfg.block_size, self.group, cfg.kernels
            )
            threshold = cfg.layer_threshold(self.layer_index) if cfg.selection == "threshold" else None
            kept = select_blocks(
                scores,
                valid,
                keep_ratio=cfg.keep_ratio,
                threshold=threshold,
                keep_first=cfg.keep_first_block,
                keep_last=cfg.keep_last_block,
            )
        sel = local_selection(kept, rank, world, cfg.block_size)
        if not self.dense:
            self.state.selections[self.layer_index] = sel
        return sel


def apply_sequence_parallel(model, group=None):
    """Make every decoder layer of a LeMo model sequence-parallel over `group` (in place; returns model).
    `remove_lemo` undoes this too. Call after apply_lemo; PEFT may come before or after."""
    lm = unwrap(model)
    handle = getattr(lm, "_lemo", None)
    if handle is None:
        raise ValueError("apply_lemo first: sequence parallelism runs LeMo's layers")
    cfg = handle.config
    if cfg.scorer != "oracle" or cfg.movement_kernel != "torch":
        raise ValueError("sequence parallelism supports scorer='oracle' and movement_kernel='torch'")
    adapter = get_adapter(lm.config.model_type)
    world = dist.get_world_size(group)
    layers = adapter.decoder(lm).layers
    for i, layer in enumerate(layers):
        parts = adapter.parts(layer)
        if not parts.rope or parts.dropout or parts.q_prescale != 1.0:
            raise ValueError(f"sequence parallelism supports the Llama family, not {lm.config.model_type}")
        if parts.num_heads % world or parts.num_kv_heads % world:
            raise ValueError(f"{parts.num_heads} query / {parts.num_kv_heads} KV heads do not split over {world} ranks")
        if not isinstance(layer, LeMoLayer):  # a dense layer: wrapped, and restored by remove_lemo
            handle.originals[i] = layer
            layer = layers[i] = LeMoLayer(layer, i, adapter, cfg, None, handle.state)
            layer.dense = True
        layer.__class__ = SequenceParallelLayer  # same children, names and state; only forward/select change
        layer.group = group
    handle.state.always_sparse = True  # as the layers: no dense fallback below min_sparse_tokens (a slice's length)
    rank_channels_globally(model, group)  # channel-mode MLPs rank over the whole sequence
    return model


def shard_sequence(input_ids: torch.Tensor, labels: torch.Tensor | None = None, group=None) -> dict:
    """This rank's contiguous slice of a (1, L) batch, with global position ids and targets shifted
    before slicing (the target of a slice's last token is the next slice's first)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    b, length = input_ids.shape
    if b != 1 or length % world:
        raise ValueError(f"sequence parallelism takes batch 1 and a length divisible by {world}, got {(b, length)}")
    targets = shift_labels(input_ids if labels is None else labels)
    part = slice(rank * length // world, (rank + 1) * length // world)
    positions = torch.arange(length, device=input_ids.device)[None]
    return {
        "input_ids": input_ids[:, part],
        "position_ids": positions[:, part],
        "targets": targets[:, part],
        "labelled": int((targets != IGNORE_INDEX).sum()),
    }


def sequence_parallel_loss(model, batch: dict, segment: int = 4096) -> torch.Tensor:
    """This rank's share of the mean next-token loss over the whole sequence (shares sum to it):
    decoder on the slice, then LM head + cross-entropy in segments (lemo.segment_loss)."""
    lm = unwrap(model)
    base = getattr(lm, lm.base_model_prefix)
    hidden = base(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    head = lm.get_output_embeddings()
    targets = batch["targets"].reshape(-1).to(hidden.device)
    flat = hidden.reshape(targets.numel(), -1)
    mean = SegmentedCrossEntropy.apply(flat, head.weight, head.bias, targets, segment or targets.numel())
    return mean * (targets != IGNORE_INDEX).sum() / max(batch["labelled"], 1)


def sync_gradients(model, group=None) -> None:
    """Sum trainable gradients over the sequence-parallel group (each rank holds part of the loss)."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all adapters
        dist.all_reduce(flat, group=group)
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))
