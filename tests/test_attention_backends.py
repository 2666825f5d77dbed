import pytest
import torch
import torch.nn.functional as F

from lemo_baselines.attention import BACKENDS, attention_context, get_backend, require_available, unavailable_reason


def test_unknown_backend_lists_known():
    with pytest.raises(ValueError, match="known: sdpa-flash"):
        get_backend("flash2")


def test_cuda_only_backends_are_unavailable_on_cpu_with_a_reason():
    assert unavailable_reason("sdpa-math", "cpu", torch.float32) is None
    reason = unavailable_reason("sdpa-cudnn", "cpu", torch.float32)
    assert reason and "cuDNN" in reason
    with pytest.raises(RuntimeError, match="choose another"):
        require_available("sdpa-cudnn", "cpu", torch.float32)


def test_forced_backend_never_falls_back():
    q = k = v = torch.randn(1, 2, 16, 8)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    with attention_context("sdpa-math"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(RuntimeError):  # no memory-efficient kernel on CPU; math could run it, but is not allowed
        with attention_context("sdpa-efficient"):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_every_backend_has_a_label():
    assert all(b.label for b in BACKENDS.values())
