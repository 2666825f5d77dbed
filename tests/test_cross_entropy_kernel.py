"""The Triton in-place cross-entropy kernel and the fused head + CE, in fp32 (on CPU through the Triton
interpreter, see conftest.py), against torch references and the plain F.linear + F.cross_entropy path."""

import builtins

import pytest
import torch
import torch.nn.functional as F

from lemo import LeMoConfig, apply_lemo
from lemo.kernels import cross_entropy as ce
from lemo.kernels.cross_entropy import cross_entropy_grad_, cross_entropy_grad_reference, fused_linear_cross_entropy
from lemo.segment_loss import segmented_lm_loss
from tests.helpers import assert_grads_close, lora_grads, tiny_lora_model

pytestmark = pytest.mark.skipif(
    not ce.triton_available("cuda" if torch.cuda.is_available() else "cpu"),
    reason="needs triton (CUDA or TRITON_INTERPRET=1)",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _plain(hidden, head, labels):
    logits = head(hidden).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize(
    "n, v, block, ignored",
    [
        (1, 1000, None, "none"),  # single row, V not a power of two
        (37, 1000, 256, "some"),  # several blocks per row, last one partial; n odd
        (5, 32003, None, "some"),  # Llama-like V + 3: partial last block of the default size
        (6, 257, 64, "all"),  # every row ignored: zero loss, zero gradient
        (3, 17, None, "none"),  # V smaller than the minimum block
    ],
)
def test_kernel_matches_reference(n, v, block, ignored):
    z = torch.randn(n, v, device=DEV) * 4
    t = torch.randint(0, v, (n,), device=DEV)
    t[-1] = v - 1  # the last column as a target
    if ignored == "some":
        t[::3] = -100
    elif ignored == "all":
        t[:] = -100
    loss_r, lse_r, grad_r = cross_entropy_grad_reference(z, t, 0.25)
    buf = z.clone()
    loss, lse = cross_entropy_grad_(buf, t, 0.25, block=block)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf, grad_r, rtol=1e-5, atol=1e-7)
    if ignored == "all":
        assert not buf.any() and not loss.any()
    # the reference is right: plain CE and autograd
    z_ = z.clone().requires_grad_(True)
    plain = F.cross_entropy(z_, t, ignore_index=-100, reduction="sum")
    (g,) = torch.autograd.grad(plain * 0.25, z_)
    torch.testing.assert_close(loss_r.sum(), plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_r, g, rtol=1e-5, atol=1e-7)


def test_kernel_strided_rows_and_tensor_scale():
    """A segment of a wider buffer (row stride > V) and a device scale, as the fused forward uses it."""
    big = torch.randn(9, 300, device=DEV)
    z = big[2:7, :250]
    t = torch.tensor([3, -100, 249, 0, 100], device=DEV)
    loss_r, lse_r, grad_r = cross_entropy_grad_reference(z, t, torch.tensor(0.5))
    untouched = big[:, 250:].clone()
    cross_entropy_grad_(z, t, torch.tensor(0.5, device=DEV), block=64)
    torch.testing.assert_close(z, grad_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(big[:, 250:], untouched, rtol=0, atol=0)


def test_fused_scaled_grad_no_bias_and_retain_graph():
    """grad_loss != 1 scales every stored gradient; a second backward gives the same gradients."""
    hidden = torch.randn(50, 24, requires_grad=True)
    weight = torch.randn(1000, 24, requires_grad=True)
    t = torch.randint(0, 1000, (50,))
    t[5:9] = -100
    ref = F.cross_entropy(F.linear(hidden, weight).float(), t) * 3.0
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    loss = fused_linear_cross_entropy(hidden, weight, None, t, segment=16) * 3.0
    g1 = torch.autograd.grad(loss, [hidden, weight], retain_graph=True)
    g2 = torch.autograd.grad(loss, [hidden, weight])
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for a, b, c in zip(g1, g2, ref_grads):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


def test_fused_all_ignored_gives_nan_and_zero_gradients_like_torch():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    t = torch.full((10,), -100)
    loss = fused_linear_cross_entropy(hidden, weight, None, t, segment=4)
    loss.backward()
    assert loss.isnan() and not hidden.grad.any() and not weight.grad.any()


def test_fused_bad_inputs_fail_clearly():
    w = torch.randn(10, 8)
    with pytest.raises(ValueError, match="out of range"):
        fused_linear_cross_entropy(torch.randn(3, 8), w, None, torch.tensor([1, 10, 2]))
    with pytest.raises(ValueError, match="out of range"):
        fused_linear_cross_entropy(torch.randn(3, 8), w, None, torch.tensor([1, -5, 2]))
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(torch.randn(3, 8, dtype=torch.float64), w, None, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="loss kernel"):
        segmented_lm_loss(
            torch.randn(1, 5, 8), torch.nn.Linear(8, 10), torch.zeros(1, 5, dtype=torch.long), kernel="bogus"
        )


def test_triton_unavailable_raises(monkeypatch):
    monkeypatch.setattr(ce, "_interpreter_on", lambda: False)
    with pytest.raises(RuntimeError, match="loss_kernel='torch'"):
        segmented_lm_loss(
            torch.randn(1, 5, 8), torch.nn.Linear(8, 10), torch.zeros(1, 5, dtype=torch.long), kernel="triton"
        )


def test_liger_missing_raises_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_liger(name, *args, **kwargs):
        if name.startswith("liger_kernel"):
            raise ImportError("No module named 'liger_kernel'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_liger)
    with pytest.raises(ValueError, match="pip install liger-kernel"):
        segmented_lm_loss(
            torch.randn(1, 5, 8), torch.nn.Linear(8, 10), torch.zeros(1, 5, dtype=torch.long), kernel="liger"
        )


@pytest.mark.parametrize("train_head", [False, True])
def test_segment_loss_liger_equals_plain(train_head):
    pytest.importorskip("liger_kernel.transformers.functional", reason="liger-kernel not installed")
    head = torch.nn.Linear(32, 101, bias=True)
    head.requires_grad_(train_head)
    hidden = torch.randn(2, 45, 32, requires_grad=not train_head)
    labels = torch.randint(0, 101, (2, 45))
    labels[0, 10:20] = -100
    wrt = ([hidden] if not train_head else []) + ([head.weight, head.bias] if train_head else [])
    ref = _plain(hidden, head, labels)
    ref_grads = torch.autograd.grad(ref, wrt)
    loss = segmented_lm_loss(hidden, head, labels, kernel="liger")
    grads = torch.autograd.grad(loss, wrt)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _whole_model(kernel, ids, labels):
    model = tiny_lora_model("llama2-tiny")
    apply_lemo(model, LeMoConfig(keep_ratio=0.5, block_size=16, segment_loss_tokens=64, loss_kernel=kernel))
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), lora_grads(model)


@pytest.fixture(scope="module")
def whole_model_batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (2, 100), generator=gen)
    labels = ids.clone()
    labels[1, 70:] = -100
    return ids, labels, _whole_model("torch", ids, labels)


@pytest.mark.parametrize("kernel", ["triton", "liger"])
def test_whole_model_loss_kernel_equals_torch(kernel, whole_model_batch, monkeypatch):
    if kernel == "liger":
        pytest.importorskip("liger_kernel.transformers.functional", reason="liger-kernel not installed")
    ids, labels, (ref_loss, ref_grads) = whole_model_batch
    calls = []
    real = ce.fused_linear_cross_entropy
    monkeypatch.setattr(ce, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, grads = _whole_model(kernel, ids, labels)
    assert len(calls) == (kernel == "triton")  # the Triton path really ran, and only for "triton"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-5, atol=1e-6)
