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
    model = apply_lemo(tiny_lora_model("llama2-tiny"),
                       LeMoConfig(keep_ratio=1.0, mlp_mode=mlp_mode, mlp_keep_channels=1.0, movement_kernel=movement,
                                  segment_loss_tokens=64))
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        rel = (grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()
        assert rel < 0.1, (n, float(rel))  # bf16 matmuls; the backward paths differ in rounding only
