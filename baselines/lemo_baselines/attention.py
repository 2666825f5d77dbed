"""Attention backends, chosen by name and forced: never a silent fallback to another kernel.

`sdpa-*` run PyTorch's scaled_dot_product_attention restricted to one backend (FlashAttention-2,
cuDNN, memory-efficient, math); `eager` is Hugging Face's matmul + softmax; `flash-attn` is the
flash_attn package, when it is importable. Every method (LoRA, LongLoRA, LeMo) runs under the same
`attention_context`, so a comparison is always on one kernel.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class Backend:
    name: str
    hf_implementation: str  # the model's attn_implementation
    sdpa_backend: SDPBackend | None  # forced SDPA kernel, if any
    label: str  # what results say ran


BACKENDS: dict[str, Backend] = {
    "sdpa-flash": Backend("sdpa-flash", "sdpa", SDPBackend.FLASH_ATTENTION, "torch SDPA FlashAttention-2"),
    "sdpa-cudnn": Backend("sdpa-cudnn", "sdpa", SDPBackend.CUDNN_ATTENTION, "torch SDPA cuDNN attention"),
    "sdpa-efficient": Backend("sdpa-efficient", "sdpa", SDPBackend.EFFICIENT_ATTENTION, "torch SDPA memory-efficient"),
    "sdpa-math": Backend("sdpa-math", "sdpa", SDPBackend.MATH, "torch SDPA math"),
    "eager": Backend("eager", "eager", None, "transformers eager (matmul + softmax)"),
    "flash-attn": Backend("flash-attn", "flash_attention_2", None, "flash_attn package"),
}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}") from None


def attention_context(name: str):
    """Context manager under which every SDPA call uses exactly backend `name` (or raises)."""
    backend = get_backend(name)
    if backend.sdpa_backend is None:
        return contextlib.nullcontext()
    return sdpa_kernel([backend.sdpa_backend])


def unavailable_reason(
    name: str, device: str | torch.device, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128, gqa: bool = False
) -> str | None:
    """Why backend `name` cannot run forward+backward here, or None when it can (probed, not guessed)."""
    backend = get_backend(name)
    device = torch.device(device)
    if name == "flash-attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn package not importable (pip install flash-attn, or use sdpa-flash)"
        if device.type != "cuda":
            return "flash_attn needs a CUDA device"
        return None
    if backend.sdpa_backend is None:
        return None
    hq, hkv = (4, 2) if gqa else (2, 2)
    q = torch.randn(1, hq, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, hkv, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, hkv, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        with attention_context(name):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            out.sum().backward()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{backend.label} cannot run on {device.type} {dtype}: {first[:200]}"
    return None


def require_available(name: str, device, dtype=torch.bfloat16, head_dim: int = 128, gqa: bool = False) -> None:
    reason = unavailable_reason(name, device, dtype, head_dim, gqa)
    if reason:
        raise RuntimeError(f"attention backend {name!r} unavailable: {reason}; choose another of {list(BACKENDS)}")


def set_model_backend(model, name: str) -> None:
    """Point the model's attention at backend `name` (the SDPA kernel itself is forced by the context)."""
    impl = get_backend(name).hf_implementation
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
