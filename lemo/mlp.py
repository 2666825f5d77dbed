"""Channel-pruned MLP backward (the LeMo artifact's MLP treatment), as an autograd Function.

Forward is the dense gated MLP, y = W_down (silu(W_gate x) * (W_up x)). For backward only the
top `keep` fraction of intermediate channels is saved, ranked per call by ||silu(g)_c|| + ||u_c||
over all tokens (the artifact's score), and the input gradient flows through those channels only:
an approximation that needs frozen MLP weights and saves keep * 2 * I values per token instead of
the ~4 * I that autograd keeps for the dense MLP. keep = 1 gives the exact gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_scores(act: torch.Tensor, up: torch.Tensor, reduce=None) -> torch.Tensor:
    """(I,) per-channel score: L2 norm over tokens of silu(gate) plus that of up. `reduce` sums the
    squared norms over ranks that hold other tokens of the sequence (sequence parallelism)."""
    if reduce is None:
        return act.float().norm(dim=0) + up.float().norm(dim=0)
    squares = reduce(torch.stack([act.float().square().sum(0), up.float().square().sum(0)]))
    return squares.sqrt().sum(0)


class ChannelPrunedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, b_gate, w_up, b_up, w_down, b_down, keep: float, reduce=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, D)
        gate = F.linear(x2, w_gate, b_gate)  # (N, I)
        up = F.linear(x2, w_up, b_up)
        act = F.silu(gate)
        n_keep = max(1, round(keep * gate.shape[1]))
        idx = torch.topk(channel_scores(act, up, reduce), n_keep, sorted=False).indices.sort().values
        out = F.linear(act.mul_(up), w_down, b_down)
        ctx.save_for_backward(gate.index_select(1, idx), up.index_select(1, idx), idx, w_gate, w_up, w_down)
        ctx.shape, ctx.x_dtype = shape, x.dtype
        return out.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        gate_c, up_c, idx, w_gate, w_up, w_down = ctx.saved_tensors
        dt = gate_c.dtype  # the forward's compute dtype (bf16 under autocast with fp32 weights)
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)
        grad_h = g @ w_down.index_select(1, idx).to(dt)  # (N, k): dL/d(act * up) on kept channels
        sig = torch.sigmoid(gate_c)
        grad_up = grad_h * (gate_c * sig)
        grad_gate = grad_h * up_c * sig * (1 + gate_c * (1 - sig))  # silu'(g) = s (1 + g (1 - s))
        grad_x = grad_gate @ w_gate.index_select(0, idx).to(dt) + grad_up @ w_up.index_select(0, idx).to(dt)
        return grad_x.to(ctx.x_dtype).view(ctx.shape), None, None, None, None, None, None, None, None


def channel_pruned_forward(
    mlp: nn.Module, keep: float, x: torch.Tensor, active_in_eval: bool = False, reduce=None
) -> torch.Tensor:
    """Drop-in forward for a Llama-family gated MLP (gate_proj, up_proj, down_proj, SiLU); dense in eval()
    (gradients taken in eval are exact) unless `active_in_eval`. `reduce` sums the channel-ranking norms
    over data-parallel ranks (lemo.distributed)."""
    linears = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if not all(type(m) is nn.Linear for m in linears) or any(m.weight.requires_grad for m in linears):
        raise ValueError(
            "channel MLP mode needs frozen plain nn.Linear gate/up/down projections; "
            "do not put LoRA on the MLP, or use mlp_mode='token'"
        )
    if not (mlp.training or active_in_eval) or not torch.is_grad_enabled() or not x.requires_grad:
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    return ChannelPrunedMLP.apply(
        x,
        mlp.gate_proj.weight,
        mlp.gate_proj.bias,
        mlp.up_proj.weight,
        mlp.up_proj.bias,
        mlp.down_proj.weight,
        mlp.down_proj.bias,
        keep,
        reduce,
    )
