import gc
import weakref

import torch

from lemo.measure import count_saved_bytes, saved_activation_bytes, time_steps
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
