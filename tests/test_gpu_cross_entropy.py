"""The fused head + cross-entropy in bf16 on a CUDA GPU (skipped elsewhere): Triton kernel, liger-kernel,
against the plain path (bf16 logits upcast to fp32) and the segmented torch path."""

import pytest
import torch
import torch.nn.functional as F

from lemo import LeMoConfig, apply_lemo
from lemo.kernels.cross_entropy import cross_entropy_grad_, cross_entropy_grad_reference
from lemo.models.registry import build_model
from lemo.segment_loss import segmented_lm_loss
from lemo_baselines.attention import attention_context

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _has_liger():
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("n, v", [(1, 32000), (1000, 32000), (77, 32003), (256, 128256)])
def test_kernel_bf16_matches_fp32_reference(n, v):
    z = (torch.randn(n, v, device="cuda") * 3).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda")
    t[::5] = -100
    loss_r, lse_r, grad_r = cross_entropy_grad_reference(z, t, 1.0 / n)  # fp32 math on the bf16 logits
    buf = z.clone()
    loss, lse = cross_entropy_grad_(buf, t, torch.tensor(1.0 / n, device="cuda"))
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse, lse_r, rtol=1e-5, atol=1e-4)
    assert _rel(buf, grad_r) < 1e-2  # both rounded once to bf16
    assert not buf[::5].any()


@pytest.mark.parametrize("kernel", ["triton", "liger"])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_bf16_matches_plain(kernel, train_head):
    if kernel == "liger" and not _has_liger():
        pytest.skip("liger-kernel not installed")
    h = torch.randn(2, 3000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head = torch.nn.Linear(256, 32000, bias=False, device="cuda", dtype=torch.bfloat16)
    head.requires_grad_(train_head)
    labels = torch.randint(0, 32000, (2, 3000), device="cuda")
    labels[1, 2000:] = -100
    wrt = [h] + ([head.weight] if train_head else [])
    logits = head(h).float()
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, 32000), labels[:, 1:].reshape(-1))
    ref = torch.autograd.grad(plain, wrt)
    del logits
    loss = segmented_lm_loss(h, head, labels, segment=1024, kernel=kernel)
    got = torch.autograd.grad(loss, wrt)
    assert abs(loss.item() - plain.item()) < 1e-3 * plain.item()
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and _rel(a, b) < 1e-2


def test_triton_peak_memory_below_torch_segmented():
    h = torch.randn(16384, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32000, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
    head = torch.nn.Linear(1024, 32000, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    head.weight.data.copy_(w)
    labels = torch.randint(0, 32000, (1, 16384), device="cuda")
    peaks = {}
    for kernel in ["torch", "triton"]:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = segmented_lm_loss(h[None], head, labels, segment=4096, kernel=kernel)
        (g,) = torch.autograd.grad(loss, h)
        del loss, g
        torch.cuda.synchronize()
        peaks[kernel] = torch.cuda.max_memory_allocated() - base
    assert peaks["triton"] < peaks["torch"], peaks


def test_whole_model_bf16_triton_equals_torch():
    ids = torch.randint(0, 512, (1, 1000), device="cuda")
    losses = {}
    for kernel in ["torch", "triton"]:
        model = build_model("llama3-tiny", device="cuda", dtype=torch.bfloat16)
        model.train()
        apply_lemo(model, LeMoConfig(keep_ratio=0.5, segment_loss_tokens=256, loss_kernel=kernel))
        with attention_context("sdpa-flash"):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        g = model.model.layers[0].self_attn.q_proj.weight.grad
        assert g is not None and torch.isfinite(g).all()
        losses[kernel] = (out.loss.float().item(), g.float())
    assert abs(losses["triton"][0] - losses["torch"][0]) <= 1e-3 * abs(losses["torch"][0])
    assert _rel(losses["triton"][1], losses["torch"][1]) < 5e-2
