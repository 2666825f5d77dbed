"""Each sparse layer's input during a frozen forward of the base model, and the oracle's block map.

`run_layers` runs the decoder (no LM head) without autograd and calls `fn(layer, parts, hidden,
position_embeddings, layout)` from a forward pre-hook of every requested layer, then stops the forward
after the last one. Work happens inside the hook, so no layer's input is kept longer than needed.
"""

from __future__ import annotations

import torch

from ..layout import TokenLayout, make_layout
from ..models.adapters import LayerParts, get_adapter, unwrap
from ..scoring import OracleScorer


class _Stop(Exception):
    pass


def as_inputs(batch, device) -> dict:
    """A (B, L) LongTensor or a dict with input_ids (+ attention_mask, position_ids) -> model kwargs."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    out = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    if out["input_ids"].dim() != 2:
        raise ValueError(f"batches must be (B, L) token ids, got shape {tuple(out['input_ids'].shape)}")
    return out


def run_layers(model, batch, layers: list[int], fn) -> dict:
    """{layer: fn(...)} for one batch; the model's train/eval state is restored afterwards."""
    lm = unwrap(model)
    adapter = get_adapter(lm.config.model_type)
    decoder = adapter.decoder(lm)
    device = lm.get_input_embeddings().weight.device
    inputs = as_inputs(batch, device)
    b, length = inputs["input_ids"].shape
    layout = make_layout(b, length, device, inputs.get("attention_mask"), inputs.get("position_ids"))
    results, last = {}, max(layers)

    def hook_for(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            results[i] = fn(i, adapter.parts(module), hidden, kwargs.get("position_embeddings"), layout)
            if i == last:
                raise _Stop

        return hook

    handles = [decoder.layers[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in layers]
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            decoder(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        lm.train(was_training)
    return results


def doc_ids_of(layout: TokenLayout) -> torch.Tensor | None:
    return None if layout.is_simple else layout.doc_ids


def oracle_block_map(
    parts: LayerParts,
    hidden: torch.Tensor,
    position_embeddings,
    layout: TokenLayout,
    block_size: int,
    kernels: str = "auto",
    return_map: bool = True,
):
    """The oracle's (map (B, nb, nb) or None, column sums (B, nb)), fp32: what OracleScorer computes."""
    return OracleScorer(kernels).block_map(parts, hidden, position_embeddings, layout, block_size, return_map)
