"""RMSNorm that saves its input in the model dtype instead of an fp32 copy (same arithmetic as HF).

Hugging Face's Llama-family RMSNorm upcasts the input to fp32 and autograd keeps that copy: 4 bytes
per hidden value per norm, two norms per layer. This Function keeps the bf16 input and the per-row
rstd (fp32) and recomputes the normalised value in backward: half the bytes, identical outputs and
gradients (y = w * (x.float() * rstd).to(dtype), as transformers computes it).
"""

from __future__ import annotations

import torch
from torch import nn

# Attribute on a tagged norm output: (input, weight, eps, input version, output version): what recomputing
# it needs, and the version counters that tell whether either was written in place since.
NORMED_FROM = "_lemo_normed_from"


def _rstd(xf: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_normed(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm's output, computed exactly as the forward computes it (for recomputation in backward)."""
    xf = x.float()
    return weight * (xf * _rstd(xf, eps)).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = _rstd(xf, eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).float().sum(0).to(weight.dtype)
        g = (grad_out * weight).float()  # gradient of the normalised value (cast back to fp32 as autograd does)
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


def rms_norm_forward(norm: nn.Module, x: torch.Tensor, tag_output: bool = False) -> torch.Tensor:
    """Drop-in forward for a Llama-family RMSNorm module (weight, variance_epsilon). `tag_output` marks
    the output with its input for LoRA A projections that recompute it (lemo.lora_norm)."""
    if not torch.is_grad_enabled():
        return type(norm).forward(norm, x)
    out = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    if tag_output and x.requires_grad:  # otherwise the norm keeps nothing the adapter could share
        setattr(out, NORMED_FROM, (x, norm.weight, norm.variance_epsilon, x._version, out._version))
    return out


def is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
