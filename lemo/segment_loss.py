"""Segment-based peak cutting: LM head + cross-entropy without full-length logits.

With a 32K-128K vocabulary the logits of a long sequence (and their fp32 copy and gradient) are a
transient peak of several GB. Here logits exist for one segment of tokens at a time: the forward
keeps only the loss, the backward recomputes each segment's logits and accumulates the gradient of
the hidden state (and of the head weight, when it trains). Same loss as Hugging Face's causal-LM
loss: logits in the model dtype, upcast to fp32, mean over labelled next-token positions.
`segmented_lm_loss(kernel=...)` also dispatches to the Triton fused head + cross-entropy
(lemo.kernels.cross_entropy) and to liger-kernel's fused linear cross-entropy.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .config import LOSS_KERNELS

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with positions: (B, L) -> (B, L), last position ignored."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


class SegmentedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, segment: int):
        # hidden (N, D), weight (V, D), targets (N,) with IGNORE_INDEX for unlabelled positions
        count = (targets != IGNORE_INDEX).sum()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], segment):
            logits = F.linear(hidden[start : start + segment], weight, bias).float()
            total += F.cross_entropy(
                logits, targets[start : start + segment], ignore_index=IGNORE_INDEX, reduction="sum"
            )
        ctx.save_for_backward(hidden, weight, bias, targets, count.clamp(min=1))
        ctx.segment = segment
        return total / count  # NaN when no position is labelled (zero gradients), as Hugging Face's loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, count = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        scale = grad_loss / count
        for start in range(0, hidden.shape[0], ctx.segment):
            h = hidden[start : start + ctx.segment]
            t = targets[start : start + ctx.segment]
            grad = torch.softmax(F.linear(h, weight, bias).float(), dim=-1)
            valid = t != IGNORE_INDEX
            grad[valid, t[valid]] -= 1.0
            grad.mul_(valid[:, None] * scale)
            grad = grad.to(hidden.dtype)  # the plain path casts here too (backward of .float())
            if need_h:
                grad_h[start : start + ctx.segment] = grad @ weight
            if need_w:
                grad_w += grad.t().float() @ h.float()
            if need_b:
                grad_b += grad.float().sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
        )


def segmented_lm_loss(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, segment: int = 4096, kernel: str = "torch"
) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `labels` (B, L), segment by segment.

    `kernel`: "torch" (SegmentedCrossEntropy: loss in the forward, logits recomputed in the backward),
    "triton" (lemo.kernels.cross_entropy.FusedLinearCrossEntropy: gradients made in the forward with an
    in-place Triton cross-entropy kernel, no recompute) or "liger" (liger-kernel's fused linear
    cross-entropy; it picks its own chunk size from V / D and ignores `segment`). A backend that cannot
    run here raises; there is no silent fallback.
    """
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"loss kernel must be one of {LOSS_KERNELS}, got {kernel!r}")
    if segment < 1:
        raise ValueError(f"segment must be >= 1 token, got {segment}")
    b, length, d = hidden.shape
    if tuple(labels.shape) != (b, length):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden states {(b, length)}")
    targets = shift_labels(labels).reshape(-1).to(hidden.device)
    flat = hidden.reshape(b * length, d)
    if kernel == "triton":
        from .kernels.cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(flat, head.weight, head.bias, targets, segment)
    if kernel == "liger":
        return _liger_loss(flat, head.weight, head.bias, targets)
    return SegmentedCrossEntropy.apply(flat, head.weight, head.bias, targets, segment)


def _liger_loss(hidden, weight, bias, targets):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as err:
        raise ValueError(
            f"loss_kernel='liger' needs liger-kernel (`pip install liger-kernel`), which could not be imported: {err}"
        ) from err
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            f"liger-kernel's fused linear cross-entropy needs CUDA tensors, got {hidden.device} "
            "(or TRITON_INTERPRET=1); use loss_kernel='torch'"
        )
    trains_head = weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and trains_head and not hidden.requires_grad:
        # Liger computes the head's gradients only when its input requires grad.
        hidden = hidden.detach().requires_grad_(True)
    # Same semantics as the torch path: model-dtype logits upcast to fp32, mean over labelled tokens,
    # head gradients accumulated in fp32.
    return liger_fused_linear_cross_entropy(
        hidden, weight, targets, bias, ignore_index=IGNORE_INDEX, reduction="mean", accum_dtype=torch.float32
    )
