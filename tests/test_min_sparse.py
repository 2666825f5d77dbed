"""LeMoConfig.min_sparse_tokens: shorter sequences run the sparse layers dense (no scoring), longer ones sparse."""

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state
from tests.helpers import assert_grads_close, lora_grads, tiny_lora_model

LENGTH = 150


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_below_the_crossover_layers_run_dense_above_it_sparse(checkpointing):
    model = tiny_lora_model("llama2-tiny")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 512, (2, LENGTH))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    config = LeMoConfig(
        keep_ratio=0.3, block_size=16, mlp_mode="token", segment_loss_tokens=0, min_sparse_tokens=LENGTH + 1
    )
    apply_lemo(model, config)
    loss, grads = _loss_and_grads(model, ids)
    assert lemo_state(model).selections == {}  # nothing was scored
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(grads, ref_grads)

    config.min_sparse_tokens = LENGTH  # the same model at the crossover: sparse again
    loss, grads = _loss_and_grads(model, ids)
    assert lemo_state(model).selections and abs(loss.item() - ref_loss.item()) > 1e-4
