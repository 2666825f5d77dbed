"""Adapter-only checkpoints under DDP / FSDP2: only the trainable (LoRA) weights are gathered and
written, by rank 0, in PEFT's own format (loadable with `PeftModel.from_pretrained`); the frozen base
model is never gathered."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def peft_model(model: nn.Module) -> nn.Module:
    """The PeftModel inside a DDP wrapper (FSDP2 does not wrap)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable parameters by name, on CPU. Collective under FSDP2: call on every rank."""
    return {name: _full(p) for name, p in peft_model(model).named_parameters() if p.requires_grad}


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """Write the adapter (adapter_model.safetensors + adapter_config.json) from rank 0."""
    pm = peft_model(model)
    state = trainable_state(pm)
    if _is_writer():
        pm.save_pretrained(str(directory), state_dict=state)
    if dist.is_initialized():
        dist.barrier()


def load_adapter(model: nn.Module, directory: str | Path) -> None:
    """Load an adapter written by save_adapter into a (possibly sharded) model, on every rank."""
    from peft.utils import load_peft_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    pm = peft_model(model)
    weights = load_peft_weights(str(directory), device="cpu")  # keys without the adapter name
    name = pm.active_adapter
    state = {}
    for key, p in pm.named_parameters():
        if p.requires_grad:
            saved = key.replace(f".{name}.", ".")
            if saved not in weights:
                raise KeyError(f"{directory}: adapter has no weight for {key} (looked up {saved})")
            state[key] = weights[saved]
    # set_model_state_dict scatters full tensors into FSDP2's shards (plain copy otherwise).
    set_model_state_dict(pm, state, options=StateDictOptions(full_state_dict=True, strict=False))
