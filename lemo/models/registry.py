"""Embedded model architectures: published shapes, built with random weights or loaded locally.

Nothing can be downloaded, so every architecture the benchmarks use is written down here from the
published Hugging Face `config.json` of its checkpoint. Random bf16 weights are made directly on the
target device; a local checkpoint directory replaces them when one is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Shapes as published (config.json of each checkpoint); only fields that change memory or speed.
_LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
_LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
)
# Mistral-7B-v0.3: the v0.1 shapes with a 32768 vocabulary and no sliding window.
_MISTRAL_7B = dict(
    vocab_size=32768,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1000000.0,
    sliding_window=None,
)
_QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    use_sliding_window=False,
)
_OPT = dict(vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True, enable_bias=True)


@dataclass(frozen=True)
class ModelSpec:
    """One named architecture: the HF model_type and the config fields that define its shape."""

    name: str
    model_type: str
    fields: dict = field(default_factory=dict)
    source: str = ""  # where the shapes come from

    @property
    def max_positions(self) -> int:
        return self.fields["max_position_embeddings"]

    @property
    def uses_rope(self) -> bool:
        return self.model_type != "opt"


def _tiny(base: dict, **over) -> dict:
    """A CPU-sized member of a family: same structure (GQA, biases, norms), small dimensions."""
    d = dict(base)
    d.update(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, vocab_size=512)
    if "num_key_value_heads" in base:
        d["num_key_value_heads"] = 4 if base["num_key_value_heads"] == base["num_attention_heads"] else 2
    d.update(over)
    return d


REGISTRY: dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec("llama2-7b", "llama", _LLAMA2_7B, "meta-llama/Llama-2-7b-hf"),
    "llama3-8b": ModelSpec("llama3-8b", "llama", _LLAMA3_8B, "meta-llama/Meta-Llama-3-8B"),
    "mistral-7b": ModelSpec("mistral-7b", "mistral", _MISTRAL_7B, "mistralai/Mistral-7B-v0.3"),
    "qwen2.5-7b": ModelSpec("qwen2.5-7b", "qwen2", _QWEN25_7B, "Qwen/Qwen2.5-7B"),
    "opt-350m": ModelSpec(
        "opt-350m",
        "opt",
        dict(
            _OPT,
            hidden_size=1024,
            ffn_dim=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            word_embed_proj_dim=512,
            do_layer_norm_before=False,
        ),
        "facebook/opt-350m",
    ),
    "opt-1.3b": ModelSpec(
        "opt-1.3b",
        "opt",
        dict(
            _OPT, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32, word_embed_proj_dim=2048
        ),
        "facebook/opt-1.3b",
    ),
    "opt-2.7b": ModelSpec(
        "opt-2.7b",
        "opt",
        dict(
            _OPT,
            hidden_size=2560,
            ffn_dim=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            word_embed_proj_dim=2560,
        ),
        "facebook/opt-2.7b",
    ),
    "opt-6.7b": ModelSpec(
        "opt-6.7b",
        "opt",
        dict(
            _OPT,
            hidden_size=4096,
            ffn_dim=16384,
            num_hidden_layers=32,
            num_attention_heads=32,
            word_embed_proj_dim=4096,
        ),
        "facebook/opt-6.7b",
    ),
    # CPU-sized variants of each family (tests and the cpu sweep profile).
    "llama2-tiny": ModelSpec("llama2-tiny", "llama", _tiny(_LLAMA2_7B), "llama2-7b structure, tiny"),
    "llama3-tiny": ModelSpec("llama3-tiny", "llama", _tiny(_LLAMA3_8B), "llama3-8b structure (GQA), tiny"),
    "mistral-tiny": ModelSpec("mistral-tiny", "mistral", _tiny(_MISTRAL_7B), "mistral-7b structure, tiny"),
    "qwen2.5-tiny": ModelSpec("qwen2.5-tiny", "qwen2", _tiny(_QWEN25_7B), "qwen2.5-7b structure (qkv bias), tiny"),
    "opt-tiny": ModelSpec(
        "opt-tiny",
        "opt",
        dict(
            _OPT,
            vocab_size=512,
            hidden_size=64,
            ffn_dim=160,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=64,
        ),
        "opt-1.3b structure, tiny",
    ),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}") from None


def rope_scale_factor(spec: ModelSpec, context: int) -> int:
    """Linear RoPE scaling factor for `context` (the paper: ceil(context / original context))."""
    return max(1, math.ceil(context / spec.max_positions))


def make_config(spec: ModelSpec, context: int | None = None, attn_implementation: str = "sdpa"):
    """The HF config for `spec`, with RoPE linear scaling when `context` exceeds the original length."""
    from transformers import AutoConfig

    fields = dict(spec.fields)
    if spec.uses_rope:
        theta = fields.pop("rope_theta")
        factor = rope_scale_factor(spec, context or 0)
        rope = {"rope_type": "default", "rope_theta": theta}
        if factor > 1:
            rope = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
        fields["rope_parameters"] = rope
    elif context is not None and context > spec.max_positions:
        raise ValueError(
            f"{spec.name} has learned positions for {spec.max_positions} tokens and cannot take {context}; "
            f"use a context <= {spec.max_positions} (OPT has no RoPE to rescale)"
        )
    cfg = AutoConfig.for_model(spec.model_type, **fields)
    cfg._attn_implementation = attn_implementation
    cfg.use_cache = False
    return cfg


def build_model(
    name: str,
    *,
    context: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    checkpoint: str | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    """A causal LM for `name`: random weights made on `device`, or `checkpoint` (a local directory).

    `context` sets RoPE linear scaling by ceil(context / original context) (RoPE models only).
    """
    from transformers import AutoModelForCausalLM

    if checkpoint is not None:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, device_map=str(device), attn_implementation=attn_implementation
        )
        model.config.use_cache = False
        if context is not None:
            _check_positions(model.config, context)
        return model
    spec = get_spec(name)
    cfg = make_config(spec, context, attn_implementation)
    torch.manual_seed(seed)
    # Building under the device context allocates and initialises every weight there: no CPU detour.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    return model


def _check_positions(cfg, context: int) -> None:
    """A checkpoint is used as saved; say so when its positions cannot reach `context`."""
    params = getattr(cfg, "rope_parameters", None) or {}
    factor = float(params.get("factor", 1.0)) if params.get("rope_type") == "linear" else 1.0
    if cfg.model_type == "opt" and cfg.max_position_embeddings < context:
        raise ValueError(f"checkpoint has learned positions for {cfg.max_position_embeddings} tokens, not {context}")
    if cfg.max_position_embeddings * factor < context:
        need = math.ceil(context / cfg.max_position_embeddings)
        raise ValueError(
            f"checkpoint positions ({cfg.max_position_embeddings} x factor {factor:g}) cannot take {context} tokens; "
            f"save it with rope_parameters={{'rope_type': 'linear', 'factor': {need}}}"
        )
