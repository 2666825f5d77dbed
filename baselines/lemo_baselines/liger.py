"""Liger-Kernel on a model instance, reversibly: the `lora-liger` baseline and LeMo's `liger` option.

`apply_liger` calls liger-kernel's own `apply_liger_kernel_to_llama(model=...)` (what a user runs):
RoPE, RMSNorm, SwiGLU and the fused linear cross-entropy (FLCE), no plain cross-entropy. That call
patches the model instance (norm and MLP forwards, the causal LM's forward) and also the Llama
modeling module itself (`apply_rotary_pos_emb`, the RMSNorm and MLP classes), which every later
Llama model built in the process would inherit. The harness measures several methods on one model in
one process, so every attribute the call changed is recorded (diffed around the call) and
`remove_liger` puts each one back: afterwards the model and the modeling module are as before.

Needs liger-kernel (`pip install -e '.[liger]'`); Llama-family model types only (llama2, llama3).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

from lemo.models.adapters import unwrap

_MISSING = object()
SUPPORTED = ("llama",)


@dataclass
class LigerOptions:
    rope: bool = True
    rms_norm: bool = True
    swiglu: bool = True
    fused_linear_cross_entropy: bool = True


@dataclass
class LigerPatch:
    """(object, attribute, previous value or _MISSING) for every attribute the Liger call changed."""

    changes: list


def _state(obj) -> dict:
    return dict(vars(obj))


def _diff(obj, before: dict) -> list:
    after = vars(obj)
    changed = [(obj, k, before.get(k, _MISSING)) for k, v in after.items() if k not in before or before[k] is not v]
    return changed + [(obj, k, v) for k, v in before.items() if k not in after]


def apply_liger(model, options: LigerOptions | None = None):
    """Liger kernels into `model` (optionally PEFT-wrapped), in place; `remove_liger` undoes it. Returns `model`."""
    options = options or LigerOptions()
    lm = unwrap(model)
    if getattr(lm, "_liger", None) is not None:
        raise ValueError("Liger is already applied to this model; call remove_liger(model) first")
    model_type = lm.config.model_type
    if model_type not in SUPPORTED:
        raise ValueError(f"Liger baseline supports model types {SUPPORTED}, not {model_type!r}")
    if getattr(lm.config, "hidden_act", "silu") != "silu":
        raise ValueError(f"Liger's SwiGLU needs a SiLU MLP, not {lm.config.hidden_act!r}")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as err:
        raise ValueError(f"the Liger baseline needs liger-kernel (pip install -e '.[liger]'): {err}") from err
    family = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    objects = [family, *lm.modules()]
    before = [_state(o) for o in objects]
    apply_liger_kernel_to_llama(model=lm, cross_entropy=False, **asdict(options))
    # Liger patches attributes only (it swaps no submodule in instance mode), so a shallow diff sees it all.
    changes = [c for o, b in zip(objects, before) for c in _diff(o, b)]
    lm._liger = LigerPatch(changes)
    return model


def remove_liger(model):
    """Undo apply_liger: every attribute it changed (instance and modeling module) restored. Returns `model`."""
    lm = unwrap(model)
    patch = getattr(lm, "_liger", None)
    if patch is None:
        raise ValueError("Liger is not applied to this model")
    for obj, key, old in reversed(patch.changes):
        if old is _MISSING:
            delattr(obj, key)
        else:
            setattr(obj, key, old)
    del lm._liger
    return model


def is_applied(model) -> bool:
    return getattr(unwrap(model), "_liger", None) is not None
