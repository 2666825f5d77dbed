"""Architecture adapters: where a family keeps its decoder layers and the pieces LeMo rearranges.

One table keyed by `config.model_type`. A sparse layer needs the two pre-norms, the attention
projections, the MLP, the head geometry, and whether positions enter through RoPE (Llama family)
or were added at the input (OPT). Post-norm models are rejected: an eliminated token must pass
through a layer unchanged, which a norm after the residual add would not allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class LayerParts:
    attn_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    mlp_norm: nn.Module
    mlp: Callable[[torch.Tensor], torch.Tensor]  # normed hidden -> MLP output
    attn_module: nn.Module  # passed to the HF attention interface (GQA groups, training flag)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float  # softmax scale used inside attention
    q_prescale: float  # OPT multiplies q by the scale before attention (and then uses 1.0)
    rope: bool
    dropout: float  # residual dropout on each update (OPT), 0 for the Llama family
    gated_mlp: nn.Module | None  # the gate/up/down MLP module, for channel mode


def _llama_parts(layer) -> LayerParts:
    attn = layer.self_attn
    cfg = attn.config
    return LayerParts(
        attn_norm=layer.input_layernorm,
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        v_proj=attn.v_proj,
        o_proj=attn.o_proj,
        mlp_norm=layer.post_attention_layernorm,
        mlp=layer.mlp,
        attn_module=attn,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=attn.head_dim,
        scaling=attn.scaling,
        q_prescale=1.0,
        rope=True,
        dropout=0.0,
        gated_mlp=layer.mlp,
    )


def _opt_parts(layer) -> LayerParts:
    if not layer.do_layer_norm_before:
        raise ValueError(
            "LeMo needs a pre-norm model: this OPT (opt-350m) normalises after the residual add, "
            "so an eliminated token could not pass through unchanged; use opt-1.3b or larger"
        )
    attn = layer.self_attn

    def mlp(h):
        return layer.fc2(layer.activation_fn(layer.fc1(h)))

    return LayerParts(
        attn_norm=layer.self_attn_layer_norm,
        q_proj=attn.q_proj,
        k_proj=attn.k_proj,
        v_proj=attn.v_proj,
        o_proj=attn.out_proj,
        mlp_norm=layer.final_layer_norm,
        mlp=mlp,
        attn_module=attn,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_heads,
        head_dim=attn.head_dim,
        scaling=1.0,
        q_prescale=attn.scaling,
        rope=False,
        dropout=layer.dropout,
        gated_mlp=None,
    )


@dataclass(frozen=True)
class Adapter:
    decoder: Callable  # causal LM -> module owning `.layers` (receives attention_mask, position_ids)
    parts: Callable[[nn.Module], LayerParts]


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(lambda m: m.model, _llama_parts),
    "mistral": Adapter(lambda m: m.model, _llama_parts),
    "qwen2": Adapter(lambda m: m.model, _llama_parts),
    "opt": Adapter(lambda m: m.model.decoder, _opt_parts),
}


def get_adapter(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(f"LeMo does not support model_type {model_type!r}; supported: {', '.join(ADAPTERS)}") from None


def unwrap(model) -> nn.Module:
    """The Hugging Face causal LM inside a PEFT wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model
