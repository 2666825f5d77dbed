"""The LongLoRA baseline (Chen et al., ICLR 2024): LoRA + S2-Attn + trainable embeddings and norms.

S2-Attn (shifted sparse attention) is LongLoRA's training-time attention. The sequence of length L is
cut into groups of g = int(group_ratio * L) tokens (1/4 of the context by default) and attention is
causal inside each group only. The second half of the attention heads sees the sequence rolled by
-g/2 first (and its output is rolled back by +g/2), so its groups straddle the first half's group
borders and information flows between groups across layers. In eval mode the model's own dense
causal attention runs untouched: LongLoRA fine-tunes sparse and infers dense.

How it is hooked in, without patching any model class: a wrapper attention function is registered
with transformers' AttentionInterface under its own name, wrapping the implementation the model had
(`sdpa`, `eager`, `flash_attention_2`, or any registered name), and the model's attention
implementation is switched to it. The wrapper name also gets the inner implementation's mask
function, so the model builds exactly the masks it built before. `remove_s2_attn` switches back.

Choices, and where they differ from the reference code (dvlab-research/LongLoRA):
- The shift is a roll, as in the reference's non-flash path and the paper's pseudocode. In the
  shifted heads the last group therefore holds the last g/2 tokens followed by the first g/2, and
  the first g/2 tokens attend to the sequence's end (the reference's flash path instead cuts the
  shifted heads into half-groups at both ends). Cost is identical; only those g/2 tokens differ.
- The roll is by g // 2 both ways. For even g (any context that is a multiple of 8 at ratio 1/4)
  this is exactly the reference; for odd g the reference rolls by -(g+1)//2 and back by g//2.
- L must be a multiple of g (the reference raises too): pad batches to such a length.
- Batches must be unpadded and unpacked (padding or packing masks are rejected, like the reference
  which only handles right padding in its flash path). Eval mode accepts anything the model does.
- GQA: the shifted heads are the second half of the key/value heads and their query heads, which
  needs an even number of key/value heads (the reference repeats K/V to all heads first: the same
  split when the count is even).
- Inner calls per group: `sdpa` and flash implementations get no mask and is_causal=True; any other
  (`eager`, `flex_attention`, custom) gets an explicit additive causal mask per group, since `eager`
  takes its causal mask from outside.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import lora

FAMILIES = ("llama", "mistral", "qwen2")
# LongLoRA's `trainable_params="embed,norm"`, as parameter-name substrings.
TRAINABLE = {"embed": "embed_tokens", "norm": "norm"}
# Packing / varlen information meant for the full sequence; meaningless per group.
_SEQUENCE_KWARGS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal")


@dataclass
class LongLoraOptions:
    group_ratio: float = 0.25  # group size as a fraction of the sequence (the paper: 1/4)
    trainable: tuple = field(default_factory=lambda: ("embed", "norm"))  # besides LoRA (the paper: embed,norm)

    def __post_init__(self):
        if not 0 < self.group_ratio <= 1:
            raise ValueError(f"group_ratio must be in (0, 1] (the paper uses 0.25), got {self.group_ratio!r}")
        if isinstance(self.trainable, str):
            self.trainable = tuple(t for t in self.trainable.split(",") if t)
        self.trainable = tuple(self.trainable)
        unknown = set(self.trainable) - set(TRAINABLE)
        if unknown:
            raise ValueError(f"unknown trainable group(s) {sorted(unknown)}; choose from {list(TRAINABLE)}")


# ---- S2-Attn at the attention-function level -------------------------------------------------

def group_size(length: int, group_ratio: float) -> int:
    """Tokens per group for a sequence of `length` (the reference: int(length * ratio), dividing length)."""
    g = int(length * group_ratio)
    if g < 1 or length % g:
        ok = next((n for n in range(length + 1, 2 * length + 64)
                   if int(n * group_ratio) >= 1 and n % int(n * group_ratio) == 0), None)
        hint = f" (the next such length is {ok})" if ok else ""
        raise ValueError(
            f"S2-Attn splits the sequence into groups of int(L * {group_ratio:g}) tokens and needs L to be a "
            f"multiple of that group size; L={length} gives groups of {g}. Pad the batch or choose a context "
            f"that splits into whole groups, e.g. a multiple of {round(1 / group_ratio)}{hint}, or change "
            "group_ratio")
    return g


def _unpadded_error() -> ValueError:
    return ValueError(
        "S2-Attn (LongLoRA training) needs full-length, unpadded, unpacked sequences, but the batch is padded or "
        "packs several documents. Train on batches of exactly the context length without padding (concatenate "
        "text into fixed-length chunks, attention_mask=None), or use model.eval() for dense attention")


def _check_plain_causal(mask, length: int) -> None:
    """S2-Attn trains on full, unpadded, unpacked sequences: any mask must be plain causal (or all ones)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) and hasattr(mask, "to_dense"):  # flex attention's BlockMask
        mask = mask.to_dense()
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        ok = bool(mask.bool().all())
    elif isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2:] == (length, length):
        allowed = mask if mask.dtype == torch.bool else mask == 0
        ok = bool((allowed == torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()).all())
    else:
        ok = False
    if not ok:
        raise _unpadded_error()


def _check_kv_heads(num_kv_heads: int) -> None:
    if num_kv_heads % 2:
        raise ValueError(
            f"S2-Attn shifts the second half of the key/value heads, so it needs an even number of them; this "
            f"model has {num_kv_heads}. Use a model with an even num_key_value_heads, or the plain 'lora' method")


def _halves_roll(x: torch.Tensor, shift: int, heads_dim: int, seq_dim: int) -> torch.Tensor:
    """Roll the second half of the heads by `shift` along the sequence; the first half is untouched."""
    first, second = x.chunk(2, dim=heads_dim)
    return torch.cat([first, second.roll(shift, dims=seq_dim)], dim=heads_dim)


def _to_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """(B, H, L, D) -> (B * L/g, H, g, D): each group becomes a batch entry."""
    b, h, length, d = x.shape
    return x.view(b, h, length // g, g, d).transpose(1, 2).reshape(b * (length // g), h, g, d)


class _ConfigView:
    """The module's config, seen with the inner implementation's name (flash reads it to pick a kernel)."""

    def __init__(self, config, implementation: str):
        self._config = config
        self._attn_implementation = implementation

    def __getattr__(self, name):
        return getattr(self._config, name)


class _ModuleView:
    """The attention module as the inner implementation should see it: everything but the config name."""

    def __init__(self, module, implementation: str):
        self._module = module
        self.config = _ConfigView(module.config, implementation)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _inner_function(implementation: str, module) -> Callable:
    if implementation == "eager":
        # HF keeps `eager` out of the registry: each modeling file defines its own eager_attention_forward.
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling file; "
                             "build the model with attn_implementation='sdpa'")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation]


def make_s2_attention(implementation: str, group_ratio: float = 0.25) -> Callable:
    """An HF attention function: S2-Attn over `implementation` when the module trains, `implementation` else.

    Signature as transformers 5.x calls it: fn(module, query (B, H, L, D), key/value (B, Hkv, L, D),
    attention_mask, scaling=..., dropout=..., **kwargs) -> (output (B, L, H, D), weights or None).
    """
    LongLoraOptions(group_ratio=group_ratio)  # validates the ratio
    uses_is_causal = implementation == "sdpa" or "flash" in implementation

    def s2_attention(module, query, key, value, attention_mask, **kwargs):
        inner = _inner_function(implementation, module)
        view = _ModuleView(module, implementation)
        if not module.training:
            return inner(view, query, key, value, attention_mask, **kwargs)
        b, heads, length, _ = query.shape
        _check_kv_heads(key.shape[1])
        _check_plain_causal(attention_mask, length)
        if kwargs.get("cu_seq_lens_q") is not None:  # a packed varlen batch
            raise _unpadded_error()
        position_ids = kwargs.get("position_ids")
        if "flash" in implementation and position_ids is not None and length > 1:
            if bool((position_ids.diff(dim=-1) != 1).any()):  # flash reads packing from position_ids
                raise _unpadded_error()
        g = group_size(length, group_ratio)
        shift = g // 2
        q, k, v = (_to_groups(_halves_roll(x, -shift, 1, 2), g) for x in (query, key, value))
        inner_kwargs = {n: val for n, val in kwargs.items() if n not in _SEQUENCE_KWARGS}
        mask = None
        if not uses_is_causal:  # eager & co take the causal mask from outside
            allowed = torch.ones(g, g, dtype=torch.bool, device=query.device).tril()
            mask = torch.zeros(g, g, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min).expand(q.shape[0], 1, g, g)
        out, _ = inner(view, q, k, v, mask, is_causal=True, **inner_kwargs)  # (B * L/g, g, H, D)
        out = out.reshape(b, length, heads, out.shape[-1])
        return _halves_roll(out, shift, 2, 1), None

    s2_attention.inner_implementation = implementation
    s2_attention.group_ratio = group_ratio
    return s2_attention


# ---- switching a model to S2-Attn ------------------------------------------------------------

_REGISTERED: dict[str, tuple[str, float]] = {}  # wrapper name -> (inner implementation, group ratio)


def register_s2_attention(implementation: str, group_ratio: float = 0.25) -> str:
    """Register S2-Attn over `implementation` with transformers (idempotent); returns its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    # No "flash" (transformers would try to load a flash kernel by that name), no "/", ":" or "|".
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", implementation).replace("flash", "fa")
    name = f"longlora_s2_{tag}_r{group_ratio:g}"
    n = 1
    while _REGISTERED.get(name, (implementation, group_ratio)) != (implementation, group_ratio):
        n += 1
        name = f"longlora_s2_{tag}_r{group_ratio:g}_{n}"
    if name not in _REGISTERED:
        AttentionInterface.register(name, make_s2_attention(implementation, group_ratio))
        if implementation in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
        _REGISTERED[name] = (implementation, group_ratio)
    return name


def _hf_model(model):
    """The Hugging Face model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _set_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def check_model(model) -> None:
    """Raise a ValueError naming the fix when S2-Attn cannot run on `model` (family, head layout)."""
    cfg = _hf_model(model).config
    if cfg.model_type not in FAMILIES:
        raise ValueError(f"S2-Attn is implemented for model_type {', '.join(FAMILIES)}, not {cfg.model_type!r}; "
                         "use the 'lora' method for this model")
    _check_kv_heads(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def apply_s2_attn(model, group_ratio: float = 0.25):
    """Switch `model` (or a PEFT wrapper of it) to S2-Attn over its current attention; returns the model."""
    hf = _hf_model(model)
    cfg = hf.config
    check_model(hf)
    if getattr(hf, "_s2_attn_original", None) is not None:
        raise ValueError("S2-Attn is already applied to this model; call remove_s2_attn(model) first")
    original = cfg._attn_implementation or "sdpa"
    _set_implementation(hf, register_s2_attention(original, group_ratio))
    hf._s2_attn_original = original
    return model


def remove_s2_attn(model):
    """Restore the attention implementation the model had before `apply_s2_attn`; returns the model."""
    hf = _hf_model(model)
    original = getattr(hf, "_s2_attn_original", None)
    if original is None:
        raise ValueError("S2-Attn is not applied to this model (apply_s2_attn was not called on it)")
    _set_implementation(hf, original)
    hf._s2_attn_original = None
    return model


def s2_attn_active(model) -> bool:
    return getattr(_hf_model(model), "_s2_attn_original", None) is not None


# ---- the method: LoRA + S2-Attn + trainable embeddings and norms ------------------------------

def mark_trainable(model, groups=("embed", "norm")) -> dict[str, bool]:
    """requires_grad=True on parameters of `groups` (LongLoRA's embed,norm); returns their previous flags."""
    substrings = [TRAINABLE[g] for g in LongLoraOptions(trainable=groups).trainable]
    previous = {}
    for name, p in model.named_parameters():
        if "lora_" not in name and any(s in name for s in substrings):
            previous[name] = p.requires_grad
            p.requires_grad_(True)
    return previous


def setup(model, options: dict):
    """Method entry point: PEFT LoRA (options["lora"]), then S2-Attn and trainable embed/norm (options["longlora"])."""
    opts = LongLoraOptions(**options.get("longlora", {}))
    check_model(model)  # before LoRA wraps it, so a refused model is left as it was
    model = lora.setup(model, options)
    apply_s2_attn(model, opts.group_ratio)
    _hf_model(model)._longlora_requires_grad = mark_trainable(model, opts.trainable)
    return model


def teardown(model):
    """Undo `setup`: S2-Attn off, requires_grad flags as LoRA left them; returns `model.unload()`."""
    remove_s2_attn(model)
    hf = _hf_model(model)
    previous = getattr(hf, "_longlora_requires_grad", None) or {}
    params = dict(model.named_parameters())
    for name, flag in previous.items():
        params[name].requires_grad_(flag)
    hf._longlora_requires_grad = None
    return model.unload()
