"""Shared test helpers: tiny models with LoRA whose adapters actually change the output."""

import torch

from lemo.models.registry import build_model
from lemo_baselines.lora import apply_lora

FAMILIES = ["llama2-tiny", "llama3-tiny", "qwen2.5-tiny", "opt-tiny"]


def tiny_lora_model(name="llama2-tiny", seed=0, lora_std=0.05):
    model = build_model(name, dtype=torch.float32, seed=seed)
    if model.config.model_type == "opt":
        model.config.dropout = 0.0
        for layer in model.model.decoder.layers:
            layer.dropout = 0.0
            layer.self_attn.dropout = 0.0
    model = apply_lora(model)
    gen = torch.Generator().manual_seed(seed + 1)
    for name_, p in model.named_parameters():
        if "lora_B" in name_:  # PEFT starts B at zero; make the adapters matter
            p.data.copy_(torch.randn(p.shape, generator=gen) * lora_std)
    model.train()
    return model


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_grads_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys() and a, "gradient sets differ or are empty"
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def patch_reference_layers(reference, state, make_forward):
    """Replace the reference model's layers that LeMo made sparse with `make_forward(layer, parts, keep)`,
    keep (B, L) bool from LeMo's own selection of that layer; returns {layer: keep}."""
    from lemo.models.adapters import get_adapter, unwrap

    lm = unwrap(reference)
    adapter = get_adapter(lm.config.model_type)
    layers = adapter.decoder(lm).layers
    b, length = state.layout.shape
    keeps = {}
    for i, sel in state.selections.items():
        keep = torch.zeros(b * length, dtype=torch.bool)
        keep[sel.index.cpu()] = True
        keeps[i] = keep.view(b, length)
        layers[i].forward = make_forward(layers[i], adapter.parts(layers[i]), keeps[i])
    return keeps


def layout_batch(mode: str, b: int = 2, length: int = 150) -> dict:
    """A training batch of one layout: "simple" rows, "padded" (row 1 padded from 101), or "packed" (two
    documents a row, positions restarting at 60)."""
    ids = torch.randint(0, 512, (b, length))
    batch = {"input_ids": ids, "labels": ids}
    if mode == "padded":
        mask = torch.ones(b, length, dtype=torch.long)
        mask[1, 101:] = 0
        batch.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    elif mode == "packed":
        batch["position_ids"] = torch.cat([torch.arange(60), torch.arange(length - 60)])[None].expand(b, -1)
    return batch
