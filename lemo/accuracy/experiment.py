"""An accuracy experiment file (workflows/accuracy/*.yaml): corpus, pretraining, fine-tuning, methods.

`methods` maps a label to method options (as the sweep's). The string "{predictors}" in an option is
replaced by the predictor directory, so the predictor-driven LeMo run names its predictors' path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import from_fields
from .finetune import FinetuneConfig
from .pretrain import PretrainConfig


@dataclass
class Experiment:
    name: str
    corpus: dict
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    methods: dict
    predictors: dict
    fidelity: dict | None = None
    model: str | None = None  # a pretrained registry name (lemo.models.pretrained): no pretraining  # {rope_factors: {factor: [contexts]}, windows, variants: {label: LeMo options}}

    def method_options(self, label: str, predictors: Path | None = None) -> dict:
        if label not in self.methods:
            raise ValueError(f"unknown method label {label!r}; this experiment has {sorted(self.methods)}")
        text = json.dumps(self.methods[label])
        if "{predictors}" in text:
            if predictors is None:
                raise ValueError(f"method {label!r} uses trained predictors: pass --predictors DIR")
            text = text.replace("{predictors}", str(predictors))
        return json.loads(text)


def load_experiment(path: Path) -> Experiment:
    data = yaml.safe_load(Path(path).read_text())
    missing = {"name", "finetune", "methods"} - set(data)
    if missing:
        raise ValueError(f"{path}: missing sections {sorted(missing)}")
    if ("pretrain" in data) == ("model" in data):
        raise ValueError(f"{path}: give either `pretrain` (a model to pretrain) or `model` (a pretrained one)")
    if "model" in data:
        from ..models.pretrained import get_pretrained

        get_pretrained(data["model"])  # unknown names fail here, naming the known ones
    return Experiment(name=data["name"], corpus=data.get("corpus", {}),
                      pretrain=from_fields(PretrainConfig, data.get("pretrain", {}), f"{path}: pretrain"),
                      finetune=from_fields(FinetuneConfig, data["finetune"], f"{path}: finetune"),
                      methods=data["methods"], predictors=data.get("predictors", {}),
                      fidelity=data.get("fidelity"), model=data.get("model"))
