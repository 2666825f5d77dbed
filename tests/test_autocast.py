"""Mixed precision as users run it: fp32 master weights under bf16 autocast.

The residual stream stays fp32 while projections return bf16; LeMo's row adds, channel-pruned MLP
backward and Triton movement must accept that and give what the untouched model gives."""

import pytest
import torch

from lemo import LeMoConfig, apply_lemo
from tests.helpers import lora_grads, tiny_lora_model


def _loss_and_grads(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), lora_grads(model)


@pytest.mark.parametrize("movement", ["torch", "triton"])
@pytest.mark.parametrize("mlp_mode", ["token", "channel"])
def test_lemo_under_autocast_matches_the_dense_model(mlp_mode, movement):
    ids = torch.randint(0, 512, (1, 200))
    ref_loss, ref_grads = _loss_and_grads(tiny_lora_model("llama2-tiny"), ids)
    model = apply_lemo(
        tiny_lora_model("llama2-tiny"),
        LeMoConfig(
            keep_ratio=1.0, mlp_mode=mlp_mode, mlp_keep_channels=1.0, movement_kernel=movement, segment_loss_tokens=64
        ),
    )
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        rel = (grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()
        assert rel < 0.1, (n, float(rel))  # bf16 matmuls; the backward paths differ in rounding only


def test_oracle_scores_in_the_autocast_dtype(monkeypatch):
    """fp32 weights under bf16 autocast: RoPE's fp32 tables would promote q, k to fp32 and the block
    scores would run (slowly) in fp32; the scorer hands them over in bf16, like the attention sees them."""
    import lemo.scoring as scoring

    seen = []
    real = scoring.block_scores_torch

    def spy(q, k, **kw):
        seen.append((q.dtype, k.dtype))
        return real(q, k, **kw)

    monkeypatch.setattr(scoring, "block_scores_torch", spy)
    model = apply_lemo(tiny_lora_model("llama2-tiny"), LeMoConfig(block_size=16, keep_ratio=0.5))
    ids = torch.randint(0, 512, (1, 128))
    _loss_and_grads(model, ids)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    seen.clear()
    model(input_ids=ids, labels=ids).loss.backward()  # without autocast the fp32 model scores in fp32
    assert set(seen) == {(torch.float32, torch.float32)}
