"""The LongLoRA baseline (Chen et al., ICLR 2024): LoRA + S2-Attn + trainable embeddings and norms.

S2-Attn (shifted sparse attention) is LongLoRA's training-time attention. The sequence of length L is
cut into n = L/g groups of g = int(group_ratio * L) tokens (1/4 of the context by default) and attention
is causal inside each segment only. The first half of the attention heads uses the groups [0, g),
[g, 2g), ..., [L-g, L). The second half uses segments shifted by h = g // 2: [0, h), [h, h+g), ...,
[L-g+h, L), i.e. a half group at each end and n-1 full groups in between, so its segments straddle the
first half's group borders and information flows between groups across layers. Nothing wraps around:
in every head a token attends to itself and earlier tokens of its own segment only, never to a later
token, so S2-Attn is causal like the dense attention it replaces. In eval mode the model's own dense
causal attention runs untouched: LongLoRA fine-tunes sparse and infers dense.

How it is hooked in, without patching any model class: a wrapper attention function is registered
with transformers' AttentionInterface under its own name, wrapping the implementation the model had
(`sdpa`, `eager`, `flash_attention_2`, or any registered name), and the model's attention
implementation is switched to it. The wrapper name also gets the inner implementation's mask
function, so the model builds exactly the masks it built before. `remove_s2_attn` switches back.

Choices, and where they differ from the reference code (dvlab-research/LongLoRA):
- The shifted heads are cut into half groups at both ends, as in the reference's flash path (its
  non-flash path and the paper's pseudocode roll the sequence by -g/2 instead, so the first shifted
  group holds the last g/2 tokens followed by the first g/2: the first g/2 tokens then see the end of
  the sequence, a future-token leak in causal training). A token still attends to at most g tokens;
  the two end half groups are two causal blocks of g/2 tokens where the roll had one of g, so the
  shifted heads compute about g^2/4 fewer attention scores per sequence (1/(2n) of their work).
- The split point is h = g // 2 (the reference's flash path too): for odd g the first end segment has
  g // 2 tokens and the last one g - g // 2.
- L must be a multiple of g (the reference raises too): pad batches to such a length.
- Batches must be unpadded and unpacked (padding or packing masks are rejected, like the reference
  which only handles right padding in its flash path). Eval mode accepts anything the model does.
- GQA: the shifted heads are the second half of the key/value heads and their query heads, which
  needs an even number of key/value heads (the reference repeats K/V to all heads first: the same
  split when the count is even).
- Inner calls, two per layer, batched over segments (no loop over groups): one over the first half's n
  groups and the second half's n-1 middle groups together (both are g long, with half of the query and
  half of the key/value heads each), one over the two end half groups stacked as a batch of 2 (two
  calls when g is odd and the ends differ in length). `sdpa` and flash implementations get no mask and
  is_causal=True; any other (`eager`, `flex_attention`, custom) gets an explicit additive causal mask,
  since `eager` takes its causal mask from outside.
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
        ok = next(
            (
                n
                for n in range(length + 1, 2 * length + 64)
                if int(n * group_ratio) >= 1 and n % int(n * group_ratio) == 0
            ),
            None,
        )
        hint = f" (the next such length is {ok})" if ok else ""
        raise ValueError(
            f"S2-Attn splits the sequence into groups of int(L * {group_ratio:g}) tokens and needs L to be a "
            f"multiple of that group size; L={length} gives groups of {g}. Pad the batch or choose a context "
            f"that splits into whole groups, e.g. a multiple of {round(1 / group_ratio)}{hint}, or change "
            "group_ratio"
        )
    return g


def _unpadded_error() -> ValueError:
    return ValueError(
        "S2-Attn (LongLoRA training) needs full-length, unpadded, unpacked sequences, but the batch is padded or "
        "packs several documents. Train on batches of exactly the context length without padding (concatenate "
        "text into fixed-length chunks, attention_mask=None), or use model.eval() for dense attention"
    )


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
            f"model has {num_kv_heads}. Use a model with an even num_key_value_heads, or the plain 'lora' method"
        )


def _s2_segments(x: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split x (B, Hx, L, D) into S2-Attn's segments (Hx even; h = g // 2, n = L / g).

    Returns (groups, first_end, last_end): groups (B * (2n-1), Hx/2, g, D) holds, per batch entry, the
    first half's n groups [0, g), ... then the second half's n-1 middle segments [h, h+g), ...,
    [L-2g+h, L-g+h); first_end (B, Hx/2, h, D) and last_end (B, Hx/2, g-h, D) are the second half's
    segments [0, h) and [L-g+h, L) (views).
    """
    length = x.shape[2]
    n, h, half = length // g, g // 2, x.shape[1] // 2
    first, second = x[:, :half], x[:, half:]
    groups = torch.cat(
        [
            first.unflatten(2, (n, g)).transpose(1, 2),  # (B, n, Hx/2, g, D)
            second[:, :, h : length - g + h].unflatten(2, (n - 1, g)).transpose(1, 2),
        ],
        dim=1,
    )
    return groups.flatten(0, 1), second[:, :, :h], second[:, :, length - g + h :]


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
            raise ValueError(
                f"{type(module).__name__} has no eager_attention_forward in its modeling file; "
                "build the model with attn_implementation='sdpa'"
            )
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
        b, _, length, _ = query.shape
        _check_kv_heads(key.shape[1])
        _check_plain_causal(attention_mask, length)
        if kwargs.get("cu_seq_lens_q") is not None:  # a packed varlen batch
            raise _unpadded_error()
        position_ids = kwargs.get("position_ids")
        if "flash" in implementation and position_ids is not None and length > 1:
            if bool((position_ids.diff(dim=-1) != 1).any()):  # flash reads packing from position_ids
                raise _unpadded_error()
        g = group_size(length, group_ratio)
        n = length // g
        inner_kwargs = {key_: val for key_, val in kwargs.items() if key_ not in _SEQUENCE_KWARGS}

        def attend(q, k, v):  # causal attention within each batch entry: (B', H', s, D) -> (B', s, H', D)
            size, mask = q.shape[2], None
            if not uses_is_causal:  # eager & co take the causal mask from outside
                allowed = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
                mask = torch.zeros(size, size, dtype=q.dtype, device=q.device)
                mask = mask.masked_fill(~allowed, torch.finfo(q.dtype).min).expand(q.shape[0], 1, size, size)
            out, _ = inner(view, q, k, v, mask, is_causal=True, **inner_kwargs)
            return out

        (q_groups, *q_ends), (k_groups, *k_ends), (v_groups, *v_ends) = (
            _s2_segments(x, g) for x in (query, key, value)
        )
        out = attend(q_groups, k_groups, v_groups)  # (B * (2n-1), g, H/2, Dv)
        out = out.reshape(b, 2 * n - 1, g, *out.shape[-2:])
        unshifted = out[:, :n].flatten(1, 2)  # (B, L, H/2, Dv)
        middle = out[:, n:].flatten(1, 2)  # (B, (n-1) g, H/2, Dv): positions h .. L-g+h
        if q_ends[0].shape[2] == q_ends[1].shape[2]:  # even g: the two end half groups as one batch of 2B
            ends = attend(*(torch.cat(e, dim=0) for e in (q_ends, k_ends, v_ends))).chunk(2, dim=0)
        else:  # odd g: ends of g // 2 and g - g // 2 tokens (the first one empty for g = 1)
            ends = [attend(q, k, v) if q.shape[2] else middle[:, :0] for q, k, v in zip(q_ends, k_ends, v_ends)]
        shifted = torch.cat([ends[0], middle, ends[1]], dim=1)  # (B, L, H/2, Dv)
        return torch.cat([unshifted, shifted], dim=2), None

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
        raise ValueError(
            f"S2-Attn is implemented for model_type {', '.join(FAMILIES)}, not {cfg.model_type!r}; "
            "use the 'lora' method for this model"
        )
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
