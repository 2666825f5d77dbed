"""Methods the benchmarks compare, behind one signature: setup(model, options) -> model, and teardown.

`lora` is PEFT LoRA; `lemo` is the same LoRA plus LeMo; `longlora` adds S2-Attn and trainable
embeddings and norms. One benchmark loop drives them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from baselines import longlora, lora

from .apply import apply_lemo, remove_lemo
from .config import LeMoConfig


def _setup_lemo(model, options: dict):
    model = lora.setup(model, options)
    try:
        return apply_lemo(model, LeMoConfig.from_dict(options.get("lemo", {})))
    except Exception:
        model.unload()  # a refused LeMo config must not leave LoRA in a model the caller reuses
        raise


def _teardown_lora(model):
    return model.unload()


def _teardown_lemo(model):
    return remove_lemo(model).unload()


@dataclass(frozen=True)
class Method:
    setup: Callable
    teardown: Callable
    describe: Callable[[dict], str]


METHODS: dict[str, Method] = {
    "lora": Method(lora.setup, _teardown_lora, lambda o: f"PEFT {lora.LoraOptions(**o.get('lora', {}))}"),
    "lemo": Method(_setup_lemo, _teardown_lemo,
                   lambda o: "LoRA + LeMo " + LeMoConfig.from_dict(o.get("lemo", {})).to_json()),
    "longlora": Method(longlora.setup, longlora.teardown,
                       lambda o: f"PEFT {lora.LoraOptions(**o.get('lora', {}))} + LongLoRA "
                                 f"{longlora.LongLoraOptions(**o.get('longlora', {}))}"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
