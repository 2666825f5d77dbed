"""PredictorScorer: the scorer protocol backed by trained layer predictors; `make_scorer` for apply_lemo."""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from ..models.adapters import LayerParts, get_adapter, unwrap
from ..scoring import OracleScorer
from .identity import identity_mismatch
from .store import PredictorSet

RETRAIN = "train predictors for this model with `lemo train-predictors --model MODEL --corpus DIR --out DIR`"


class PredictorScorer:
    """Key-block scores (B, nb) from a layer's predictor, no autograd, eval mode, in the predictors' dtype.

    The protocol does not name the layer, so it is found from `parts.attn_module` (the attention module
    object, which LeMo's wrapper and PEFT keep), registered per layer in `layer_of`; else from the
    module's `layer_idx`. Direct calls may pass `layer=`.
    """

    name = "predictor"

    def __init__(self, predictors: PredictorSet, attn_modules: dict[int, torch.nn.Module] | None = None):
        self.predictors = predictors.eval()
        self._modules = dict(attn_modules or {})  # strong refs keep the ids valid
        self._layer_of = {id(m): i for i, m in self._modules.items()}

    def layer_index(self, parts: LayerParts) -> int:
        i = self._layer_of.get(id(parts.attn_module), getattr(parts.attn_module, "layer_idx", None))
        if i is None:
            raise ValueError("PredictorScorer cannot tell which layer it scores; pass layer=")
        return int(i)

    @torch.no_grad()
    def __call__(
        self,
        parts: LayerParts,
        hidden: torch.Tensor,
        position_embeddings,
        layout: TokenLayout,
        block_size: int,
        *,
        layer: int | None = None,
    ) -> torch.Tensor:
        i = self.layer_index(parts) if layer is None else layer
        if i not in self.predictors:
            raise ValueError(f"no predictor for layer {i} (predictors cover {self.predictors.layers}); {RETRAIN}")
        if block_size != self.predictors.block_size:
            raise ValueError(f"predictors were trained for block_size {self.predictors.block_size}, not {block_size}")
        doc_ids = None if layout.is_simple else layout.doc_ids
        return self.predictors[i].scores(parts.attn_norm(hidden), doc_ids)


def load_scorer(path, model, sparse_layers: list[int] | None = None, block_size: int | None = None) -> PredictorScorer:
    """Predictors from `path`, checked against `model`, on the model's device and dtype."""
    lm = unwrap(model)
    adapter = get_adapter(lm.config.model_type)
    layers = adapter.decoder(lm).layers
    predictors = PredictorSet.load(path)
    sparse = predictors.layers if sparse_layers is None else list(sparse_layers)
    missing = [i for i in sparse if i not in predictors]
    if missing:
        raise ValueError(
            f"predictors in {path} cover layers {predictors.layers}, not sparse layers {missing}; {RETRAIN}"
        )
    if block_size is not None and block_size != predictors.block_size:
        raise ValueError(
            f"predictors in {path} were trained for block_size {predictors.block_size}, the config "
            f"uses {block_size}; {RETRAIN} --block-size {block_size}"
        )
    bad = identity_mismatch(predictors.meta["identity"], lm, [i for i in predictors.layers if i < len(layers)])
    if bad:
        raise ValueError(f"predictors in {path} belong to another model ({bad}); {RETRAIN}")
    parts = {i: adapter.parts(layers[i]) for i in sparse}
    weight = getattr(parts[sparse[0]].q_proj, "base_layer", parts[sparse[0]].q_proj).weight
    predictors.to(device=weight.device, dtype=weight.dtype)
    return PredictorScorer(predictors, {i: p.attn_module for i, p in parts.items()})


def make_scorer(config, model):
    """The scorer `config.scorer` names: the oracle, or predictors loaded from `config.predictor_path`."""
    if config.scorer == "oracle":
        return OracleScorer(config.kernels)
    if config.scorer == "predictor":
        n = len(get_adapter(unwrap(model).config.model_type).decoder(unwrap(model)).layers)
        scored = config.resolve_sparse_layers(n)
        if config.shared_selection:  # one selection, made at the first sparse layer: only it is scored
            scored = [min(scored)]
        return load_scorer(config.predictor_path, model, scored, config.block_size)
    raise ValueError(f"unknown scorer {config.scorer!r}")
