"""LeMoConfig: everything `apply_lemo` needs, validated up front, JSON round-trippable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

MLP_MODES = ("token", "channel", "dense")
SELECTIONS = ("topk", "threshold")
SCORERS = ("oracle", "predictor")
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
    # Sparse layers; None = the artifact's schedule: layers n//2-1 .. n-2 (15-30 of 32), rest dense.
    sparse_layers: list[int] | None = None
    # Tokens per block: scores are computed and tokens kept in whole blocks (the paper: 64).
    block_size: int = 64
    # Always keep the first block (attention sink) / the most recent block.
    keep_first_block: bool = False
    keep_last_block: bool = False
    # MLP in sparse layers: "token" = kept tokens only (the paper); "channel" = dense forward, backward
    # through the top `mlp_keep_channels` intermediate channels only (the artifact); "dense".
    mlp_mode: str = "token"
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
    # selective load (+ RMSNorm) and in-place residual add (lemo.kernels.movement).
    movement_kernel: str = "torch"
    # Per-segment cross-entropy: "torch", "triton" (lemo.kernels.cross_entropy) or "liger" (liger-kernel).
    loss_kernel: str = "torch"
    # LM head + cross-entropy in segments of this many tokens (recomputed); 0 = plain HF loss.
    segment_loss_tokens: int = 4096
    # Eliminate in eval mode too (normally evaluation runs the dense model).
    active_in_eval: bool = False
    # Sequences shorter than this run every sparse layer as the original dense layer (no scoring): below
    # some length scoring and movement cost more than they save ("never slower than LoRA"). 0 = always sparse.
    min_sparse_tokens: int = 0

    def __post_init__(self):
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.mlp_mode not in MLP_MODES:
            raise ValueError(f"mlp_mode must be one of {MLP_MODES}, got {self.mlp_mode!r}")
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
        if isinstance(self.min_sparse_tokens, bool) or not isinstance(self.min_sparse_tokens, int) \
                or self.min_sparse_tokens < 0:
            raise ValueError(f"min_sparse_tokens must be an int >= 0 (0 = always sparse), got {self.min_sparse_tokens!r}")
        if self.sparse_layers is not None:
            self.sparse_layers = sorted({int(i) for i in self.sparse_layers})
        if isinstance(self.threshold, dict):
            self.threshold = {int(k): float(v) for k, v in self.threshold.items()}

    def resolve_sparse_layers(self, num_layers: int) -> list[int]:
        """The sparse layer indices for a model of `num_layers`; unknown indices fail clearly."""
        if self.sparse_layers is None:
            return list(range(max(0, num_layers // 2 - 1), num_layers - 1))
        bad = [i for i in self.sparse_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"sparse_layers {bad} out of range for a model of {num_layers} layers (0..{num_layers - 1})")
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
