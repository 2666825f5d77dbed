"""LoRA A after an RMSNorm keeps the norm's input and recomputes its output (lemo.lora_norm): the
same gradients, and exactly one normalised copy fewer per layer whose input requires grad."""

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state, remove_lemo
from lemo.bench.measure import count_saved_bytes
from lemo.models.adapters import get_adapter, unwrap
from tests.helpers import assert_grads_close, lora_grads, tiny_lora_model

LENGTH = 200


def _with_norm_weights(model):
    """Norm weights away from 1, so a recomputation that drops or misplaces them shows."""
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            p.data.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def _run(recompute, mlp_mode="token", movement="torch", autocast=False, dtype=torch.float32):
    model = _with_norm_weights(tiny_lora_model("llama2-tiny")).to(dtype)
    model = apply_lemo(
        model,
        LeMoConfig(
            keep_ratio=0.5, block_size=16, mlp_mode=mlp_mode, movement_kernel=movement, lora_norm_recompute=recompute
        ),
    )
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
    layers = get_adapter(lm.config.model_type).decoder(lm).layers
    expected = 0
    for i in range(1, len(layers)):  # layer 0 reads the frozen embeddings: its norm keeps nothing of its own
        if i not in selections:
            expected += 2 * LENGTH * hidden * 4  # fp32 here
        elif movement == "torch":
            # the fused Triton load+norm (per layer or in a compact run) already keeps its output, not its input
            expected += selections[i].total * hidden * 4
    assert before - after == expected


def test_bf16_gradients_are_bitwise_the_same():
    """In the model dtype the recomputed norm output is the forward's, value for value."""
    _, before, ref = _run(False, dtype=torch.bfloat16)
    _, after, grads = _run(True, dtype=torch.bfloat16)
    assert after < before and ref.keys() == grads.keys()
    assert all(torch.equal(ref[n], grads[n]) for n in ref)


def test_an_in_place_write_to_the_norm_output_falls_back():
    """A norm output changed in place is not what recomputation would give: lora_A keeps it instead."""
    from lemo.lora_norm import lora_a_forward
    from lemo.norm import rms_norm_forward

    norm = torch.nn.Module()
    norm.weight, norm.variance_epsilon = torch.nn.Parameter(torch.rand(16) + 0.5, requires_grad=False), 1e-6
    linear = torch.nn.Linear(16, 4)
    x = torch.randn(5, 16, requires_grad=True)
    for write in (False, True):
        h = rms_norm_forward(norm, x.clone(), tag_output=True)
        if write:
            h.mul_(2)
        out = lora_a_forward(linear, h)
        assert (type(out.grad_fn).__name__ == "LinearOfNormBackward") == (not write)
        out.sum().backward()
        expected = h.detach().sum(0).expand(4, -1)  # dL/dW for L = sum(h W^T)
        torch.testing.assert_close(linear.weight.grad, expected)
        linear.weight.grad = None


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


def test_adapters_added_after_lemo_are_patched_and_restored():
    from lemo.models.registry import build_model
    from lemo_baselines.lora import apply_lora

    base = apply_lemo(build_model("llama2-tiny", dtype=torch.float32), LeMoConfig(keep_ratio=0.5, block_size=16))
    model = apply_lora(base)
    model.train()
    ids = torch.randint(0, 512, (1, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    assert [m for m in model.modules() if "forward" in vars(m) and isinstance(m, torch.nn.Linear)]
    remove_lemo(model)
    assert not [m for m in model.modules() if "forward" in vars(m)]
