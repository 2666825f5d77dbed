"""LoRA A after an RMSNorm keeps the norm's input and recomputes its output (lemo.lora_norm): the
same gradients, and exactly one normalised copy fewer per layer whose input requires grad."""

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state, remove_lemo
from lemo.measure import count_saved_bytes
from lemo.models.adapters import get_adapter, unwrap
from tests.helpers import assert_grads_close, lora_grads, tiny_lora_model

LENGTH = 200


def _run(recompute, mlp_mode="token", movement="torch", autocast=False):
    model = apply_lemo(tiny_lora_model("llama2-tiny"),
                       LeMoConfig(keep_ratio=0.5, block_size=16, mlp_mode=mlp_mode, movement_kernel=movement,
                                  lora_norm_recompute=recompute))
    ids = torch.randint(0, 512, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    with count_saved_bytes(model) as saved, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return model, saved.total, lora_grads(model)


@pytest.mark.parametrize("movement", ["torch", "triton"])
@pytest.mark.parametrize("mlp_mode", ["token", "channel"])
def test_same_gradients_and_one_normalised_copy_fewer(mlp_mode, movement):
    _, before, ref = _run(False, mlp_mode, movement)
    model, after, grads = _run(True, mlp_mode, movement)
    assert_grads_close(ref, grads)
    lm = unwrap(model)
    hidden = lm.config.hidden_size
    selections = lemo_state(model).selections
    layers = len(get_adapter(lm.config.model_type).decoder(lm).layers)
    expected = 0
    for i in range(1, layers):  # layer 0 reads the frozen embeddings: its norm keeps nothing of its own
        if i not in selections:
            expected += 2 * LENGTH * hidden * 4  # fp32 here
        elif movement == "torch":  # the fused Triton load+norm already keeps its output, not its input
            expected += selections[i].total * hidden * 4
    assert before - after == expected


def test_falls_back_where_the_adapter_does_not_read_the_norm_output():
    """Under autocast lora_A reads a cast copy: nothing changes, and nothing breaks."""
    _, before, ref = _run(False, autocast=True)
    _, after, grads = _run(True, autocast=True)
    assert before == after
    assert_grads_close(ref, grads)


def test_remove_lemo_restores_the_adapters():
    model, _, _ = _run(True)
    patched = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" in vars(m)]
    assert patched, "no lora_A was routed through lemo.lora_norm"
    remove_lemo(model)
    assert not [m for m in model.modules() if "forward" in vars(m)]
