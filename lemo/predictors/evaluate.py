"""Predictor quality: how many of the oracle's kept blocks the predictor keeps too.

`collect_scores` runs the frozen model over batches and records, per sparse layer, the predicted and
the oracle key-block scores and the valid blocks (on CPU). `selection_counts` compares the predicted
selection (top-k at `keep_ratio`, or a threshold in units of the predicted mean) with the oracle's
top-k at `keep_ratio`:

    recall       = |predicted kept & oracle kept| / |oracle kept|
    mass_recall  = oracle score mass of (predicted kept & oracle kept) / oracle score mass of oracle kept
    kept_fraction = |predicted kept| / |valid blocks|

`recall_rows` gives one row per layer and an overall row (layer "all", counts summed over layers).
"""

from __future__ import annotations

from typing import Iterable

from ..selection import block_valid, select_blocks
from .collect import doc_ids_of, oracle_block_map, run_layers
from .store import PredictorSet


def collect_scores(model, predictors: PredictorSet, batches: Iterable, kernels: str = "auto") -> dict[int, list]:
    """{layer: [(predicted (B, nb), oracle (B, nb), valid (B, nb)) per batch]}, fp32/bool on CPU."""
    bs = predictors.block_size
    out = {i: [] for i in predictors.layers}

    def score(i, parts, hidden, position_embeddings, layout):
        _, oracle = oracle_block_map(parts, hidden, position_embeddings, layout, bs, kernels, return_map=False)
        pred = predictors[i].scores(parts.attn_norm(hidden), doc_ids_of(layout))
        return pred.cpu(), oracle.cpu(), block_valid(layout.valid, bs).cpu()

    was_training = predictors.training
    predictors.eval()
    try:
        for batch in batches:
            for i, v in run_layers(model, batch, predictors.layers, score).items():
                out[i].append(v)
    finally:
        predictors.train(was_training)
    return out


def selection_counts(entries: list, keep_ratio: float = 0.4, threshold: float | None = None) -> dict:
    """Summed counts over a layer's batches; `threshold` switches the predicted selection to thresholding."""
    c = dict(overlap=0, oracle_kept=0, predicted_kept=0, valid=0, mass_overlap=0.0, mass_oracle=0.0)
    for pred, oracle, valid in entries:
        o = select_blocks(oracle, valid, keep_ratio=keep_ratio)
        p = select_blocks(pred, valid, keep_ratio=keep_ratio, threshold=threshold)
        c["overlap"] += int((p & o).sum())
        c["oracle_kept"] += int(o.sum())
        c["predicted_kept"] += int(p.sum())
        c["valid"] += int(valid.sum())
        c["mass_overlap"] += float((oracle * (p & o)).sum())
        c["mass_oracle"] += float((oracle * o).sum())
    return c


def _metrics(c: dict) -> dict:
    return dict(
        recall=c["overlap"] / max(c["oracle_kept"], 1),
        mass_recall=c["mass_overlap"] / c["mass_oracle"] if c["mass_oracle"] > 0 else 1.0,
        kept_fraction=c["predicted_kept"] / max(c["valid"], 1),
    )


def recall_rows(scores: dict[int, list], keep_ratio: float = 0.4, thresholds: dict[int, float] | None = None) -> list:
    """Rows (dicts) per layer plus layer="all"; with `thresholds` the predicted side uses threshold selection."""
    rows, total = [], None
    for layer, entries in scores.items():
        th = None if thresholds is None else thresholds[layer]
        c = selection_counts(entries, keep_ratio, th)
        rows.append(
            dict(
                layer=layer,
                keep_ratio=keep_ratio,
                selection="topk" if th is None else "threshold",
                threshold=th,
                **_metrics(c),
                **c,
            )
        )
        total = c if total is None else {k: total[k] + c[k] for k in c}
    if total is not None:
        rows.append(
            dict(
                layer="all",
                keep_ratio=keep_ratio,
                selection=rows[0]["selection"],
                threshold=None,
                **_metrics(total),
                **total,
            )
        )
    return rows


def evaluate_predictors(
    model, predictors: PredictorSet, batches: Iterable, keep_ratio: float = 0.4, kernels: str = "auto"
) -> list:
    """Top-k recall rows (per layer and overall) of `predictors` against the oracle on `batches`."""
    return recall_rows(collect_scores(model, predictors, batches, kernels), keep_ratio)
