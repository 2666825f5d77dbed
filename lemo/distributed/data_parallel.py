"""Data parallelism for a LeMo + PEFT LoRA model: DDP or FSDP2, with torch's own engines.

Order matters: build the model, apply PEFT and LeMo, enable gradient checkpointing (transformers'
method needs the unwrapped model, and FSDP2 swaps module classes), make the initial weights equal on
every rank, then wrap. LeMo reads q_proj/k_proj for scoring inside the decoder layer's forward, and the
segmented loss reads the LM head inside the causal LM's forward, so with `fully_shard` on every layer
and on the root, every weight LeMo touches is unsharded when it is read (tests/test_distributed.py
checks losses, gradients and kept blocks against one process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..models.adapters import get_adapter, unwrap
from .channel import rank_channels_globally


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing on every decoder layer (LeMo layers included); call
    before wrapping. LeMo selects outside the checkpoint, so recomputation never re-scores."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0, group=None, trainable_only: bool = True) -> None:
    """Copy rank `src`'s parameters to every rank. PEFT draws lora_A from the global RNG, so ranks that
    were not seeded alike start with different adapters; FSDP2 (unlike DDP) does not sync at wrap time.
    With trainable_only=False the frozen base weights are sent too (random-weight models)."""
    for p in model.parameters():
        if p.requires_grad or not trainable_only:
            dist.broadcast(p.data, src=src, group=group)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    lm = unwrap(model)
    return get_adapter(lm.config.model_type).decoder(lm).layers


def wrap_ddp(model: nn.Module, device: torch.device | None = None, global_channels: bool = True, **kwargs) -> nn.Module:
    """DistributedDataParallel; DDP broadcasts rank 0's parameters at construction and averages
    gradients, so the loss must be a per-rank mean over equally many labelled tokens for the result to
    equal one process on the concatenated batch. `global_channels`: channel-mode MLPs rank channels over
    every rank's tokens, as one process on the whole batch would (lemo.distributed.channel)."""
    from torch.nn.parallel import DistributedDataParallel

    if global_channels:
        rank_channels_globally(model)
    ids = [device] if device is not None and device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **kwargs)


def shard_fsdp2(
    model: nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True, global_channels: bool = True
) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, LM head).

    Frozen base weights are sharded like the adapters; FSDP2 reduce-scatters gradients only for
    parameters that require them, so frozen weights cost their shard and nothing else. Gradients and
    parameters are DTensors afterwards (`.full_tensor()` to gather one). LeMo's kernels read weights
    directly (fused norm loads, channel MLP, segmented loss) only inside the forward of the module that
    owns them or in autograd backward after FSDP2's pre-backward unshard; sharding below the decoder
    layer (e.g. a norm alone) would hand them sharded DTensors, so shard per layer or coarser."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if global_channels:
        rank_channels_globally(model, mesh.get_group() if mesh is not None else None)
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
    }
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model
