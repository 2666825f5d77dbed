import contextlib
import gc
import weakref

import pytest
import torch

from lemo.bench.measure import count_saved_bytes, saved_activation_bytes, time_steps
from tests.helpers import tiny_lora_model


def test_counts_saved_inputs_not_parameters():
    lin = torch.nn.Linear(32, 16)  # trainable: its backward needs x
    x = torch.randn(10, 32, requires_grad=True)
    with count_saved_bytes(lin) as saved:
        torch.relu(lin(x))
    # linear saves x and its weight (a parameter: not counted); relu saves its output
    assert saved.total == 10 * 32 * 4 + 10 * 16 * 4


def test_attributes_bytes_to_the_running_module():
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    with count_saved_bytes(torch.nn.ModuleList([a, b]), {"a": a, "b": b}) as saved:
        out = b(a(x))
    assert out.shape == (5, 4)  # hooks do not replace outputs
    assert saved.by_module == {"a": 5 * 8 * 4, "b": 5 * 8 * 4}


def test_probe_forward_leaves_no_graph_alive():
    """Regression: a pack hook returning the tensor itself kept every probe's graph alive."""
    model = tiny_lora_model("llama2-tiny")
    ids = torch.randint(0, 512, (1, 64))
    refs = []
    layer = model.base_model.model.model.layers[0].mlp
    handle = layer.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    saved = saved_activation_bytes(model, {"input_ids": ids, "labels": ids})
    handle.remove()
    gc.collect()
    assert saved.total > 0 and refs and refs[0]() is None


def test_time_steps_reports_median_and_throughput_on_cpu():
    model = tiny_lora_model("llama2-tiny")
    ids = torch.randint(0, 512, (2, 64))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = time_steps(model, {"input_ids": ids, "labels": ids}, opt, warmup=1, steps=3)
    assert len(stats.step_s) == 3 and stats.tokens == 128
    assert stats.tokens_per_s == 128 / stats.median_s
    assert stats.peak_allocated is None and stats.nvml_peak_used is None  # no CUDA, no NVML here
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "the optimizer step did not update the LoRA parameters"


def _checkpointed_lemo_model(movement="torch"):
    from lemo import LeMoConfig, apply_lemo
    from lemo.bench.bench import _set_checkpointing

    model = apply_lemo(
        tiny_lora_model("llama2-tiny"), LeMoConfig(block_size=8, keep_ratio=0.5, movement_kernel=movement)
    )
    _set_checkpointing(model, True)
    return model


def test_offloading_moves_every_checkpointed_layer_input():
    """The premise of activation offload: non-reentrant checkpointing saves each layer's input through
    the saved-tensors hooks that `offloading` installs (were it held by reference, it would stay on the GPU)."""
    from lemo.bench.measure import offloading

    assert isinstance(offloading(True, torch.device("cpu")), torch.autograd.graph.saved_tensors_hooks)
    model = _checkpointed_lemo_model()
    layers = model.base_model.model.model.layers
    inputs, packed = {}, set()

    def record_input(i):
        def hook(module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).data_ptr()

        return hook

    def pack(t):
        packed.add(t.data_ptr())
        return t.detach()

    hooks = [layer.register_forward_pre_hook(record_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    ids = torch.randint(0, 512, (1, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for h in hooks:
        h.remove()
    assert len(inputs) == len(layers)
    missing = [i for i, ptr in inputs.items() if ptr not in packed]
    assert not missing, f"layer inputs not offloaded (kept by reference): {missing}"


@pytest.mark.parametrize("movement", ["torch", "triton"])
def test_saved_tensors_copied_away_give_the_same_gradients(movement):
    """What offload does on a GPU: every saved tensor is a snapshot taken in the forward (on CPU,
    save_on_cpu's copy is the tensor itself, so a clone stands in for the device-to-host copy). The
    Triton path must then not add into a residual that was saved (it clones instead)."""
    from tests.helpers import assert_grads_close, lora_grads

    ids = torch.randint(0, 512, (2, 64))
    grads = []
    for snapshot in (False, True):
        model = _checkpointed_lemo_model(movement)
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
        with hooks if snapshot else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(lora_grads(model))
    assert_grads_close(grads[0], grads[1])


def test_time_steps_offloads_every_step(monkeypatch):
    import lemo.bench.measure as measure

    entered = []
    real = measure.offloading
    monkeypatch.setattr(measure, "offloading", lambda on, device: entered.append(on) or real(on, device))
    model = tiny_lora_model("llama2-tiny")
    ids = torch.randint(0, 512, (1, 32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    measure.time_steps(model, {"input_ids": ids, "labels": ids}, opt, warmup=1, steps=2, offload=True)
    assert entered == [True, True, True]
