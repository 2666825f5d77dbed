import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lemo.bench.measure import count_saved_bytes
from lemo.mlp import channel_pruned_forward, channel_scores


class GatedMLP(nn.Module):
    def __init__(self, d, i):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, i, bias=False), nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.act_fn = nn.SiLU()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_keep_all_channels_is_the_exact_gradient():
    mlp = GatedMLP(24, 70)
    x = torch.randn(2, 33, 24, requires_grad=True)
    g = torch.randn(2, 33, 24)
    ref = mlp(x)
    (ref_dx,) = torch.autograd.grad(ref, x, g)
    out = channel_pruned_forward(mlp, 1.0, x)
    (dx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)


def test_pruned_gradient_flows_only_through_top_channels():
    mlp = GatedMLP(24, 70)
    x = torch.randn(1, 41, 24, requires_grad=True)
    g = torch.randn(1, 41, 24)
    keep = 0.2
    with torch.no_grad():
        gate, up = mlp.gate_proj(x[0]), mlp.up_proj(x[0])  # (tokens, channels)
        idx = torch.topk(channel_scores(F.silu(gate), up), round(keep * 70)).indices
    mask = torch.zeros(70)
    mask[idx] = 1.0
    # reference: the same forward, gradient through masked intermediate channels only
    h = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    h_ref = h.detach() + (h - h.detach()) * mask
    (ref_dx,) = torch.autograd.grad(mlp.down_proj(h_ref), x, g)
    out = channel_pruned_forward(mlp, keep, x)
    (dx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out, mlp(x))
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)


def test_saves_only_kept_channels():
    mlp = GatedMLP(16, 100)
    x = torch.randn(1, 30, 16, requires_grad=True)
    with count_saved_bytes(mlp) as saved:
        channel_pruned_forward(mlp, 0.2, x)
    assert saved.total == 2 * 30 * 20 * 4 + 20 * 8  # gate and up on 20 channels (fp32) + channel index


def test_trainable_mlp_weights_are_rejected():
    mlp = GatedMLP(8, 16)
    mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        channel_pruned_forward(mlp, 0.2, torch.randn(1, 4, 8, requires_grad=True))
