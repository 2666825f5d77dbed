"""LeMoConfig: everything `apply_lemo` needs, validated up front, JSON round-trippable."""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import asdict, dataclass, fields

MLP_MODES = ("token", "channel", "dense")
SELECTIONS = ("topk", "threshold")
SCORERS = ("oracle", "predictor")
ELIMINATED = ("skip", "frozen")
FROZEN_KEYS = ("local", "all")
LOSS_TOKENS = ("all", "kept")
KERNEL_CHOICES = ("auto", "triton", "torch")
MOVEMENT_KERNELS = ("torch", "triton")
LOSS_KERNELS = ("torch", "triton", "liger")


def from_fields(cls, data: dict, where: str):
    """`cls(**data)` for a dataclass, naming unknown keys instead of failing on the first one."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(known)}")
    return cls(**data)


_KINDS = {  # annotation -> (accepts, what the message says is allowed)
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def check_types(obj) -> None:
    """Fields annotated bool, int, float or str (optionally `| None`) must hold that type: a YAML
    "false" is truthy, "0.4" or None fail later with unrelated errors, 1.5 tokens fail at the first forward."""
    for f in fields(obj):
        annotation = str(f.type)
        optional = annotation.endswith(" | None")
        kind = _KINDS.get(annotation.removesuffix(" | None"))
        value = getattr(obj, f.name)
        if kind is None or (optional and value is None):
            continue  # compound annotations are checked by their class
        accepts, what = kind
        if not accepts(value):
            raise ValueError(
                f"{type(obj).__name__}: {f.name} must be {what}{' or null' if optional else ''}, "
                f"got {value!r} ({type(value).__name__})"
            )


def typed_from_mapping(cls, data, where: str):
    """A dataclass from a YAML mapping: unknown keys and wrong types fail naming `where`."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    obj = from_fields(cls, data, where)
    try:
        check_types(obj)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return obj


def _layer_list(value) -> list[int]:
    """sparse_layers: a list of layer indices (ints >= 0); a string or a float is not one."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"LeMoConfig: sparse_layers must be a list of layer indices or null, got {value!r}")
    bad = [i for i in value if not _KINDS["int"][0](i) or i < 0]
    if bad:
        raise ValueError(f"LeMoConfig: sparse_layers must hold integers >= 0, got {bad!r} in {value!r}")
    return sorted({int(i) for i in value})


def _threshold_value(value, where: str) -> float:
    if not _KINDS["float"][0](value) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"LeMoConfig: {where} must be a finite number >= 0 (a multiple of the layer's mean "
            f"block score), got {value!r}"
        )
    return float(value)


def _thresholds(value) -> float | dict[int, float]:
    """One threshold, or {layer: threshold} (JSON gives the layers as strings of digits)."""
    if not isinstance(value, dict):
        return _threshold_value(value, "threshold")
    out = {}
    for k, v in value.items():
        layer = int(k) if isinstance(k, str) and k.isdigit() else k
        if not _KINDS["int"][0](layer):
            raise ValueError(f"LeMoConfig: threshold keys must be layer indices, got {k!r}")
        out[int(layer)] = _threshold_value(v, f"threshold[{k!r}]")
    return out


@dataclass
class LeMoConfig:
    """Contextual token elimination (LeMo, arXiv 2501.09767).

    In each sparse layer only the kept 64-token blocks take part in attention (and, in `token` MLP
    mode, in the MLP); eliminated tokens pass through on the residual stream unchanged.
    """

    # Fraction of blocks kept in a sparse layer (the artifact keeps 40%).
    keep_ratio: float = 0.4
    # "topk": keep ceil(keep_ratio * blocks); "threshold": keep blocks whose score / layer-mean >= threshold.
    selection: str = "topk"
    # Per-layer thresholds ({layer: value}) or one value for all, in units of the layer's mean score.
    threshold: float | dict[int, float] = 1.0
    # Sparse layers; None = layers `sparse_first` .. n-2 (the last layer stays dense). Given, it overrides
    # sparse_first.
    sparse_layers: list[int] | None = None
    # First sparse layer when sparse_layers is None: 2 (all but the first two and the last layer; with the
    # shared selection this kept SmolLM2's perplexity within +1.3% of LoRA at 1.89x less 7B memory,
    # results/accuracy/smollm2); None = the artifact's n//2-1 (15-30 of 32).
    sparse_first: int | None = 2
    # Tokens per block: scores are computed and tokens kept in whole blocks (the paper: 64).
    block_size: int = 64
    # Always keep the first block (attention sink) / the most recent block.
    keep_first_block: bool = False
    keep_last_block: bool = False
    # MLP in sparse layers: "token" = kept tokens only (the paper); "channel" = dense forward, backward
    # through the top `mlp_keep_channels` intermediate channels only (the artifact); "dense".
    mlp_mode: str = "token"
    # What an eliminated token gets in a sparse layer: "skip" = nothing, it passes through unchanged (the
    # paper); "frozen" = the layer's update computed without gradient (lemo.frozen): the forward stays
    # near the dense one, and nothing of the eliminated tokens is saved for backward.
    eliminated: str = "skip"
    # Keys an eliminated query attends to in "frozen" mode: "local" = kept tokens + its own block; "all".
    frozen_keys: str = "local"
    # One selection for all sparse layers (made at the first one) instead of one per layer (the paper's).
    # The default: on a real model (SmolLM2, results/accuracy/smollm2) per-layer selections leave almost no
    # token kept in every layer, and the tokens that skip layers get a far-off training signal.
    shared_selection: bool = True
    # Positions whose next-token loss counts: "all" (the paper), or "kept" = only those kept in every sparse
    # layer, whose forward is the dense one's up to key sparsity (the default, with shared_selection).
    loss_tokens: str = "kept"
    # With shared_selection, token MLP mode and eliminated="skip": consecutive sparse layers run on the kept
    # rows alone, gathered once by the first and scattered back once by the last (lemo.elimination.
    # compact_layer). Same function; the inputs gradient checkpointing keeps hold kept rows only; the
    # layers of a run move no rows (movement_kernel="triton" gives them fused norms and RoPE). Ignored where
    # it does not apply (and under OPT's layerdrop).
    compact_stream: bool = True
    mlp_keep_channels: float = 0.2
    # Channel mode in every layer (the artifact does this) or in sparse layers only.
    mlp_channel_all_layers: bool = True
    # RMSNorms keep their input in the model dtype, not an fp32 copy (every layer; Llama family).
    efficient_norm: bool = True
    # LoRA A projections reading a norm's output keep the norm's input (which the norm keeps anyway) and
    # recompute the output in backward: one hidden-sized tensor less per layer (lemo.lora_norm; needs
    # efficient_norm, model-dtype adapters, no LoRA dropout, no autocast; a no-op otherwise).
    lora_norm_recompute: bool = True
    # Who decides which blocks are informative: "oracle" = real Q.K^T block scores; "predictor" = trained
    # per-layer block predictors (lemo.predictors) loaded from `predictor_path`.
    scorer: str = "oracle"
    predictor_path: str | None = None
    # Block-score implementation: "auto" = Triton on CUDA, segmented torch elsewhere.
    kernels: str = "auto"
    # Row movement in sparse layers: "torch" = index_select + scatter_add_rows; "triton" = fused
    # selective load (+ RMSNorm), RoPE at original positions and in-place residual add (lemo.kernels.movement).
    movement_kernel: str = "torch"
    # Per-segment cross-entropy: "torch", "triton" (lemo.kernels.cross_entropy) or "liger" (liger-kernel).
    loss_kernel: str = "torch"
    # LM head + cross-entropy in segments of this many tokens (recomputed); 0 = plain HF loss.
    segment_loss_tokens: int = 4096
    # Eliminate in eval mode too (normally evaluation runs the dense model).
    active_in_eval: bool = False
    # Training forwards shorter than this run the whole model as without LeMo (original layers, norms, MLPs,
    # LoRA and loss; Liger's kernels where applied; no scoring): below the crossover a step costs what LoRA's
    # does. 0 = always sparse. Not under sequence parallelism, nor for channel MLPs ranked over DP ranks.
    min_sparse_tokens: int = 0

    def __post_init__(self):
        if isinstance(self.predictor_path, os.PathLike):
            self.predictor_path = os.fspath(self.predictor_path)
        check_types(self)
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.mlp_mode not in MLP_MODES:
            raise ValueError(f"mlp_mode must be one of {MLP_MODES}, got {self.mlp_mode!r}")
        if self.eliminated not in ELIMINATED:
            raise ValueError(f"eliminated must be one of {ELIMINATED}, got {self.eliminated!r}")
        if self.frozen_keys not in FROZEN_KEYS:
            raise ValueError(f"frozen_keys must be one of {FROZEN_KEYS}, got {self.frozen_keys!r}")
        if self.loss_tokens not in LOSS_TOKENS:
            raise ValueError(f"loss_tokens must be one of {LOSS_TOKENS}, got {self.loss_tokens!r}")
        if not 0.0 < self.mlp_keep_channels <= 1.0:
            raise ValueError(f"mlp_keep_channels must be in (0, 1], got {self.mlp_keep_channels}")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.scorer == "predictor" and not self.predictor_path:
            raise ValueError("scorer='predictor' needs predictor_path (a directory written by `lemo train-predictors`)")
        if self.movement_kernel not in MOVEMENT_KERNELS:
            raise ValueError(f"movement_kernel must be one of {MOVEMENT_KERNELS}, got {self.movement_kernel!r}")
        if self.loss_kernel not in LOSS_KERNELS:
            raise ValueError(f"loss_kernel must be one of {LOSS_KERNELS}, got {self.loss_kernel!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.segment_loss_tokens < 0:
            raise ValueError(f"segment_loss_tokens must be >= 0 (0 disables), got {self.segment_loss_tokens}")
        if (
            isinstance(self.min_sparse_tokens, bool)
            or not isinstance(self.min_sparse_tokens, int)
            or self.min_sparse_tokens < 0
        ):
            raise ValueError(
                f"min_sparse_tokens must be an int >= 0 (0 = always sparse), got {self.min_sparse_tokens!r}"
            )
        if self.sparse_layers is not None:
            self.sparse_layers = _layer_list(self.sparse_layers)
        self.threshold = _thresholds(self.threshold)
        if self.sparse_first is not None and (
            isinstance(self.sparse_first, bool) or not isinstance(self.sparse_first, int) or self.sparse_first < 0
        ):
            raise ValueError(f"sparse_first must be an int >= 0 or None, got {self.sparse_first!r}")

    @classmethod
    def paper(cls, **overrides) -> "LeMoConfig":
        """The paper artifact's LeMo: the top 40% of blocks chosen per layer in layers n/2-1 .. n-2, eliminated
        tokens skipping the layer, the MLP's channel-pruned backward in every layer, the loss over all
        tokens. (On SmolLM2 it costs +75% perplexity after 4x extension: results/accuracy/smollm2.)"""
        return cls(
            **{
                **dict(
                    keep_ratio=0.4,
                    mlp_mode="channel",
                    mlp_channel_all_layers=True,
                    eliminated="skip",
                    shared_selection=False,
                    loss_tokens="all",
                    sparse_first=None,
                ),
                **overrides,
            }
        )

    def resolve_sparse_layers(self, num_layers: int) -> list[int]:
        """The sparse layer indices for a model of `num_layers`; unknown indices fail clearly."""
        if self.sparse_layers is None:
            first = max(0, num_layers // 2 - 1) if self.sparse_first is None else self.sparse_first
            layers = list(range(first, num_layers - 1))
            if not layers:
                warnings.warn(
                    f"LeMoConfig: the schedule (layers {first} .. n-2) gives no sparse layer for a "
                    f"model of {num_layers} layer(s), so nothing is eliminated; pass sparse_layers="
                    f"{list(range(num_layers))} to make its layers sparse",
                    stacklevel=2,
                )
            return layers
        bad = [i for i in self.sparse_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"sparse_layers {bad} out of range for a model of {num_layers} layers (0..{num_layers - 1})"
            )
        return list(self.sparse_layers)

    def layer_threshold(self, layer: int) -> float:
        if isinstance(self.threshold, dict):
            if layer not in self.threshold:
                raise ValueError(f"no threshold for sparse layer {layer}; give one per sparse layer or a single float")
            return self.threshold[layer]
        return float(self.threshold)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "LeMoConfig":
        return from_fields(cls, data, "LeMoConfig")

    @classmethod
    def from_json(cls, text: str) -> "LeMoConfig":
        return cls.from_dict(json.loads(text))
