"""Pattern prediction (LeMo, arXiv 2501.09767): trained per-layer block predictors that replace the oracle.

Modules: `blocks` (what a predictor reads, the shared tile mask), `net` (PathMLP, LayerPredictor),
`store` (PredictorSet, save/load), `identity` (which model a set belongs to), `scorer`
(PredictorScorer, make_scorer), `collect` (layer inputs and oracle maps from a frozen forward),
`elastic` (pruning mostly-zero units), `train`, `evaluate` (recall), `tuning` (per-layer thresholds),
`commands` (the CLI's train-predictors / eval-predictors).
"""

from .evaluate import collect_scores, evaluate_predictors, recall_rows
from .net import LayerPredictor, PathMLP, parameter_count
from .scorer import PredictorScorer, load_scorer, make_scorer
from .store import PredictorSet, build_predictors
from .train import map_loss, train_predictors
from .tuning import tune_thresholds

__all__ = [
    "LayerPredictor",
    "PathMLP",
    "PredictorScorer",
    "PredictorSet",
    "build_predictors",
    "collect_scores",
    "evaluate_predictors",
    "load_scorer",
    "make_scorer",
    "map_loss",
    "parameter_count",
    "recall_rows",
    "train_predictors",
    "tune_thresholds",
]
