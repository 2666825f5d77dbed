"""The project's targets, budgets, quality goals and the paper's reference numbers: data in
workflows/goals.yaml, read here into typed records (unknown keys and wrong types fail naming the file)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..config import typed_from_mapping
from .yamlfile import load_yaml

GOALS_FILE = Path(__file__).resolve().parents[2] / "workflows" / "goals.yaml"


@dataclass(frozen=True)
class RatioTarget:
    label: str
    model: str
    gradient_checkpointing: bool
    context: int
    metric: str
    goal: float
    paper: float


@dataclass(frozen=True)
class Budget:
    label: str
    model: str
    gradient_checkpointing: bool
    context: int
    budget_gib: float


@dataclass(frozen=True)
class QualityGoals:
    ppl_delta_pct: float
    retrieval_delta_pts: float
    memory_ratio: float
    grad_cosine: float


@dataclass(frozen=True)
class PredictorGoals:
    recall: float
    paper_recall: float
    overhead: float


@dataclass(frozen=True)
class MaxContextGoal:
    cap_gib: float
    ratio: float
    full_gpu_tokens: int  # LeMo's one step on the whole GPU, within the runner's command limit


@dataclass(frozen=True)
class KernelGoals:
    ceiling_fraction: float


@dataclass(frozen=True)
class PaperPerplexity:
    dataset: str
    context: int
    lora: float
    lemo: float


@dataclass(frozen=True)
class Goals:
    ratio_targets: list[RatioTarget]
    budgets: list[Budget]
    target_sweeps: list[str]
    quality: QualityGoals
    predictors: PredictorGoals
    max_context: MaxContextGoal
    kernels: KernelGoals
    paper_perplexity: list[PaperPerplexity]


def _list(data, key: str, cls, where: str) -> list:
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: `{key}` must be a non-empty list")
    return [typed_from_mapping(cls, item, f"{where}: {key}[{i}]") for i, item in enumerate(items)]


def load_goals(path: str | Path = GOALS_FILE) -> Goals:
    """Every section of the goals file, typed; a missing section, unknown key or wrong type is an error."""
    where = str(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping")
    known = {
        "ratio_targets",
        "budgets",
        "target_sweeps",
        "quality",
        "predictors",
        "max_context",
        "kernels",
        "paper_perplexity",
    }
    if set(data) != known:
        raise ValueError(f"{where}: sections must be exactly {sorted(known)}, got {sorted(data)}")
    sweeps = data["target_sweeps"]
    if not isinstance(sweeps, list) or not all(isinstance(s, str) for s in sweeps):
        raise ValueError(f"{where}: target_sweeps must be a list of sweep names")
    return Goals(
        ratio_targets=_list(data, "ratio_targets", RatioTarget, where),
        budgets=_list(data, "budgets", Budget, where),
        target_sweeps=list(sweeps),
        quality=typed_from_mapping(QualityGoals, data["quality"], f"{where}: quality"),
        predictors=typed_from_mapping(PredictorGoals, data["predictors"], f"{where}: predictors"),
        max_context=typed_from_mapping(MaxContextGoal, data["max_context"], f"{where}: max_context"),
        kernels=typed_from_mapping(KernelGoals, data["kernels"], f"{where}: kernels"),
        paper_perplexity=_list(data, "paper_perplexity", PaperPerplexity, where),
    )


@lru_cache(maxsize=1)
def goals() -> Goals:
    """The committed goals file (read once)."""
    return load_goals()
