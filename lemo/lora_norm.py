"""LoRA A projections fed by an RMSNorm keep the norm's input, not its output.

In a Llama block q, k and v read h = norm(x). The norm already keeps x for its own backward; PEFT's
lora_A (a trainable Linear) keeps h as well, for dA = g^T h: one more hidden-sized tensor per layer.
LeMo's RMSNorm (lemo.norm) tags its output with where it came from; a patched lora_A given a tagged
input keeps x instead and recomputes h in backward with the norm's own arithmetic (the same values).

Applies where the adapter reads the norm output unchanged: adapters in the model dtype (PEFT's default
fp32 adapters read a cast copy), no LoRA dropout, no autocast; elsewhere lora_A runs as before.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .norm import NORMED_FROM, rms_normed


class LinearOfNorm(torch.autograd.Function):
    """y = h @ W^T (+ b) for h = norm(x), saving x (shared with the norm) instead of h."""

    @staticmethod
    def forward(ctx, h, x, norm_weight, eps: float, weight, bias):
        ctx.save_for_backward(x, norm_weight, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return F.linear(h, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, norm_weight, weight = ctx.saved_tensors
        grad_h = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[4]:
            h = rms_normed(x, norm_weight, ctx.eps)
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_h, None, None, None, grad_w, grad_b


def _recomputable(h: torch.Tensor, linear: nn.Linear):
    """(x, norm weight, eps) when h is, unchanged, the tagged output of a norm of x; else None."""
    source = getattr(h, NORMED_FROM, None)
    if source is None or not torch.is_grad_enabled() or torch.is_autocast_enabled(h.device.type):
        return None
    x, norm_weight, eps, x_version, h_version = source
    # an in-place write to x or h since the norm ran would make the recomputed h differ from the one used
    if x._version != x_version or h._version != h_version or h.dtype != linear.weight.dtype:
        return None
    return x, norm_weight, eps


def lora_a_forward(linear: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for PEFT's lora_A Linear."""
    source = _recomputable(h, linear)
    if source is None:
        return F.linear(h, linear.weight, linear.bias)
    x, norm_weight, eps = source
    return LinearOfNorm.apply(h, x, norm_weight, eps, linear.weight, linear.bias)


def patch_lora_a(root: nn.Module, patched: set, wrap=None) -> None:
    """Route every PEFT lora_A Linear under `root` through `lora_a_forward` (once each; `patched` records them).
    `wrap(linear, forward)`, if given, returns what is set instead (LeMo's dense fallback)."""
    for module in root.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        for linear in lora_a.values():
            if type(linear) is nn.Linear and linear not in patched:
                forward = functools.partial(lora_a_forward, linear)
                linear.forward = forward if wrap is None else wrap(linear, forward)
                patched.add(linear)
