import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lemo.bench.measure import count_saved_bytes
from lemo.norm import rms_norm_forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_matches_transformers_rmsnorm_forward_and_backward(dtype, train_weight):
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data.normal_(1.0, 0.2)
    norm.weight.requires_grad_(train_weight)
    x = torch.randn(3, 37, 96, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 37, 96, dtype=dtype)
    ref = norm(x)
    ref_grads = torch.autograd.grad(ref, [x] + ([norm.weight] if train_weight else []), g)
    out = rms_norm_forward(norm, x)
    grads = torch.autograd.grad(out, [x] + ([norm.weight] if train_weight else []), g)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same arithmetic, bit for bit
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


def test_saves_half_the_bytes_of_transformers_rmsnorm():
    norm = LlamaRMSNorm(128).to(torch.bfloat16).requires_grad_(False)  # frozen, as under LoRA
    x = torch.randn(1, 50, 128, dtype=torch.bfloat16, requires_grad=True)
    with count_saved_bytes(norm) as hf:
        norm(x)
    with count_saved_bytes(norm) as ours:
        rms_norm_forward(norm, x)
    assert hf.total == 50 * 128 * 4 + 50 * 4  # fp32 input copy + rstd
    assert ours.total == 50 * 128 * 2 + 50 * 4  # bf16 input (the caller's tensor) + rstd
