"""A model's set of layer predictors: construction, size, and the on-disk directory format.

Directory: `predictors.safetensors` (the weights, keys "<layer>.<q|k>.<weights|biases>.<i>") and
`predictors.json` (format, block_size, sparse layers, head geometry, per-layer widths after elastic
pruning, the model identity, and training stats including the loss curve).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import LeMoConfig
from ..models.adapters import get_adapter, unwrap
from .identity import model_identity
from .net import LayerPredictor

FORMAT = "lemo-predictors/1"
WEIGHTS, META = "predictors.safetensors", "predictors.json"


class PredictorSet(nn.Module):
    """LayerPredictors keyed by sparse layer index, plus the metadata saved with them."""

    def __init__(self, predictors: dict[int, LayerPredictor], meta: dict):
        super().__init__()
        self.predictors = nn.ModuleDict({str(i): p for i, p in sorted(predictors.items())})
        self.meta = meta

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.predictors]

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    def __getitem__(self, layer: int) -> LayerPredictor:
        return self.predictors[str(layer)]

    def __contains__(self, layer: int) -> bool:
        return str(layer) in self.predictors

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def widths(self) -> dict[int, dict[str, list[int]]]:
        return {i: self[i].widths() for i in self.layers}

    def set_tracking(self, on: bool) -> None:
        for p in self.predictors.values():
            p.q.tracking = p.k.tracking = on

    def save(self, directory) -> Path:
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file({k.removeprefix("predictors."): v for k, v in state.items()}, str(out / WEIGHTS))
        meta = dict(
            self.meta,
            format=FORMAT,
            layers={str(i): w for i, w in self.widths().items()},
            parameters=self.parameter_count(),
        )
        (out / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, directory, device=None, dtype=None) -> "PredictorSet":
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / META).exists() or not (path / WEIGHTS).exists():
            raise ValueError(
                f"{path} holds no predictors ({META} + {WEIGHTS}); write them with "
                "`lemo train-predictors --model MODEL --corpus DIR --out DIR`"
            )
        try:
            meta = json.loads((path / META).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path / META}: not valid JSON ({err}); rewrite it with `lemo train-predictors`") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{path / META}: format {found!r}, expected {FORMAT!r}")
        missing = [k for k in ("block_size", "geometry", "layers", "per_head", "identity") if k not in meta]
        if not missing and "fingerprint" not in (meta["identity"] or {}):
            missing = ["identity.fingerprint"]
        if missing:
            raise ValueError(f"{path / META}: missing keys {missing}; rewrite it with `lemo train-predictors`")
        try:
            g = meta["geometry"]
            preds = {}
            for key, w in meta["layers"].items():
                preds[int(key)] = LayerPredictor(
                    g["num_heads"],
                    g["head_dim"],
                    g["slice_dim"],
                    meta["block_size"],
                    tuple(w["q"]),
                    per_head=meta["per_head"],
                    k_widths=tuple(w["k"]),
                )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path / META}: malformed layers or geometry ({type(err).__name__}: {err})") from err
        out = cls(preds, {k: v for k, v in meta.items() if k not in ("layers", "parameters")})
        try:
            out.predictors.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
        except Exception as err:  # safetensors' own error types, or missing / mis-shaped tensors
            raise ValueError(
                f"{path / WEIGHTS}: cannot load the predictor weights ({type(err).__name__}: {str(err)[:300]})"
            ) from err
        return out.to(device=device, dtype=dtype)


def build_predictors(
    model,
    sparse_layers: list[int] | None = None,
    block_size: int = 64,
    widths: tuple[int, int] = (128, 64),
    per_head: bool = False,
    seed: int = 0,
) -> PredictorSet:
    """Freshly initialised (seeded) fp32 predictors for `model`'s sparse layers, on the model's device."""
    lm = unwrap(model)
    adapter = get_adapter(lm.config.model_type)
    layers = adapter.decoder(lm).layers
    sparse = LeMoConfig(sparse_layers=sparse_layers).resolve_sparse_layers(len(layers))
    parts = adapter.parts(layers[sparse[0]])
    hidden = int(lm.config.hidden_size)
    geometry = {"num_heads": parts.num_heads, "head_dim": parts.head_dim, "slice_dim": hidden // parts.num_heads}
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        preds = {
            i: LayerPredictor(
                geometry["num_heads"], geometry["head_dim"], geometry["slice_dim"], block_size, tuple(widths), per_head
            )
            for i in sparse
        }
    finally:
        torch.random.set_rng_state(gen_state)
    meta = {
        "block_size": block_size,
        "sparse_layers": sparse,
        "geometry": geometry,
        "per_head": per_head,
        "initial_widths": list(widths),
        "seed": seed,
        "identity": model_identity(lm, sparse),
        "training": None,
    }
    return PredictorSet(preds, meta).to(device=lm.get_input_embeddings().weight.device)
