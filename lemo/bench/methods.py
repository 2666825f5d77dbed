"""Methods the benchmarks compare, behind one signature: setup(model, options) -> model, and teardown.

`lora` is PEFT LoRA; `lora-liger` adds Liger-Kernel (RoPE, RMSNorm, SwiGLU, fused linear
cross-entropy); `lemo` is the same LoRA plus LeMo, optionally over Liger (`liger: true`, see
lemo.apply for the order); `longlora` adds S2-Attn and trainable embeddings and norms. One benchmark
loop drives them all, and every teardown leaves the shared model as it found it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from lemo_baselines import liger, longlora, lora

from ..apply import apply_lemo, remove_lemo
from ..config import LeMoConfig
from ..crossover import calibrate_min_sparse_tokens, lemo_config
from ..models.adapters import unwrap


def liger_options(options: dict) -> liger.LigerOptions | None:
    """The method's `liger` entry: true (every kernel), false/absent (none), or a dict of LigerOptions."""
    value = options.get("liger", False)
    if value is False or value is None:
        return None
    if value is True:
        return liger.LigerOptions()
    if isinstance(value, dict):
        return liger.LigerOptions(**value)
    raise ValueError(
        f"liger must be true, false or a dict of {list(liger.LigerOptions.__dataclass_fields__)}, got {value!r}"
    )


def _setup_lora_liger(model, options: dict):
    model = lora.setup(model, options)
    try:
        return liger.apply_liger(model, liger_options({"liger": True, **options}))
    except Exception:
        model.unload()
        raise


def _teardown_lora_liger(model):
    return liger.remove_liger(model).unload()


def calibrate(model, options: dict, setup: tuple, batch_size: int = 1):
    """For a lemo method with `calibrate` (token counts): min_sparse_tokens chosen by lemo.crossover on this
    model as set up for measuring (call it under the point's attention backend, with its checkpointing
    set), once per base model, options and `setup` (what else changes the timings: checkpointing,
    backend, batch size), and set on the model; returns the Calibration (None without `calibrate`).
    The calibrations live on the base model, so they go with it."""
    if not options.get("calibrate"):
        return None
    done = unwrap(model).__dict__.setdefault("_lemo_calibrations", {})
    key = (json.dumps(options, sort_keys=True), setup)
    if key not in done:
        done[key] = calibrate_min_sparse_tokens(model, options["calibrate"], batch_size=batch_size)
    lemo_config(model).min_sparse_tokens = done[key].min_sparse_tokens
    return done[key]


def _setup_lemo(model, options: dict):
    model = lora.setup(model, options)
    kernels = liger_options(options)
    try:
        if kernels is not None:
            liger.apply_liger(model, kernels)  # first: LeMo's own forwards go on top of Liger's
        return apply_lemo(model, LeMoConfig.from_dict(options.get("lemo", {})))
    except Exception:  # a refused config must not leave LoRA or Liger in a model the caller reuses
        if liger.is_applied(model):
            liger.remove_liger(model)
        model.unload()
        raise


def _teardown_lora(model):
    return model.unload()


def _teardown_lemo(model):
    model = remove_lemo(model)
    if liger.is_applied(model):
        liger.remove_liger(model)
    return model.unload()


def _describe_liger(options: dict) -> str:
    kernels = liger_options(options)
    return "" if kernels is None else f" + Liger-Kernel {kernels}"


def _describe_lora(options: dict) -> str:
    return f"PEFT {lora.LoraOptions(**options.get('lora', {}))}"


@dataclass(frozen=True)
class Method:
    setup: Callable
    teardown: Callable
    describe: Callable[[dict], str]


METHODS: dict[str, Method] = {
    "lora": Method(lora.setup, _teardown_lora, _describe_lora),
    "lora-liger": Method(
        _setup_lora_liger, _teardown_lora_liger, lambda o: _describe_lora(o) + _describe_liger({"liger": True, **o})
    ),
    "lemo": Method(
        _setup_lemo,
        _teardown_lemo,
        lambda o: (
            "LoRA + LeMo "
            + LeMoConfig.from_dict(o.get("lemo", {})).to_json()
            + _describe_liger(o)
            + (f" + min_sparse_tokens calibrated at {o['calibrate']} tokens" if o.get("calibrate") else "")
        ),
    ),
    "longlora": Method(
        longlora.setup,
        longlora.teardown,
        lambda o: f"{_describe_lora(o)} + LongLoRA {longlora.LongLoraOptions(**o.get('longlora', {}))}",
    ),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
