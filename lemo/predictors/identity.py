"""Which model a predictor set belongs to: config essentials plus a fingerprint of frozen weights.

The fingerprint is a few evenly spaced values of the input embedding and of each sparse layer's
q_proj / k_proj base weight (under a LoRA wrapper, the frozen base). Values are compared with a
relative tolerance, so predictors trained on a bf16 copy still match an fp32 load of the same weights.
"""

from __future__ import annotations

import torch

from ..models.adapters import get_adapter, unwrap

SAMPLES = 8
ESSENTIALS = ("model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size")


def _sample(weight: torch.Tensor) -> list[float]:
    flat = weight.detach().reshape(-1)
    # Integer positions: a float32 linspace rounds past the end for tensors above 2**24 values (7B embeddings).
    idx = (torch.arange(SAMPLES, dtype=torch.int64) * (flat.numel() - 1) // (SAMPLES - 1)).to(flat.device)
    return [float(v) for v in flat[idx].float().cpu()]


def _base_weight(module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight


def model_identity(model, sparse_layers: list[int]) -> dict:
    """Essentials and fingerprint of `model` (HF causal LM, optionally PEFT-wrapped)."""
    lm = unwrap(model)
    cfg = lm.config
    adapter = get_adapter(cfg.model_type)
    layers = adapter.decoder(lm).layers
    parts = adapter.parts(layers[sparse_layers[0] if sparse_layers else len(layers) // 2])
    fingerprint = {"embed": _sample(_base_weight(lm.get_input_embeddings()))}
    for i in sparse_layers:
        p = adapter.parts(layers[i])
        fingerprint[f"{i}.q_proj"] = _sample(_base_weight(p.q_proj))
        fingerprint[f"{i}.k_proj"] = _sample(_base_weight(p.k_proj))
    return {
        "model_type": cfg.model_type,
        "hidden_size": int(cfg.hidden_size),
        "num_layers": len(layers),
        "num_heads": parts.num_heads,
        "num_kv_heads": parts.num_kv_heads,
        "head_dim": parts.head_dim,
        "vocab_size": int(cfg.vocab_size),
        "fingerprint": fingerprint,
    }


def identity_mismatch(saved: dict, model, sparse_layers: list[int]) -> str | None:
    """None when `model` is the model `saved` describes, else a description of the difference."""
    current = model_identity(model, sparse_layers)
    diffs = [
        f"{k}: predictors {saved.get(k)!r} vs model {current[k]!r}" for k in ESSENTIALS if saved.get(k) != current[k]
    ]
    if diffs:
        return "; ".join(diffs)
    for key, values in current["fingerprint"].items():
        if key not in saved["fingerprint"]:
            return f"no fingerprint for {key}"
        a, b = torch.tensor(saved["fingerprint"][key]), torch.tensor(values)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=1e-6):
            return f"weights differ ({key})"
    return None
