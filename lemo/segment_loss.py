"""Segment-based peak cutting: LM head + cross-entropy without full-length logits.

With a 32K-128K vocabulary the logits of a long sequence (and their fp32 copy and gradient) are a
transient peak of several GB. Here logits exist for one segment of tokens at a time: the forward
keeps only the loss, the backward recomputes each segment's logits and accumulates the gradient of
the hidden state (and of the head weight, when it trains). Same loss as Hugging Face's causal-LM
loss: logits in the model dtype, upcast to fp32, mean over labelled next-token positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], segment):
            logits = F.linear(hidden[start:start + segment], weight, bias).float()
            total += F.cross_entropy(logits, targets[start:start + segment], ignore_index=IGNORE_INDEX,
                                     reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, targets, count)
        ctx.segment = segment
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, count = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        scale = grad_loss / count
        for start in range(0, hidden.shape[0], ctx.segment):
            h = hidden[start:start + ctx.segment]
            t = targets[start:start + ctx.segment]
            grad = torch.softmax(F.linear(h, weight, bias).float(), dim=-1)
            valid = t != IGNORE_INDEX
            grad[valid, t[valid]] -= 1.0
            grad.mul_(valid[:, None] * scale)
            grad = grad.to(hidden.dtype)  # the plain path casts here too (backward of .float())
            if need_h:
                grad_h[start:start + ctx.segment] = grad @ weight
            if need_w:
                grad_w += grad.t().float() @ h.float()
            if need_b:
                grad_b += grad.float().sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None)


def segmented_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                      segment: int = 4096) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `labels` (B, L), segment by segment."""
    if segment < 1:
        raise ValueError(f"segment must be >= 1 token, got {segment}")
    b, length, d = hidden.shape
    if tuple(labels.shape) != (b, length):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden states {(b, length)}")
    targets = shift_labels(labels).reshape(-1).to(hidden.device)
    return SegmentedCrossEntropy.apply(hidden.reshape(b * length, d), head.weight, head.bias, targets, segment)
