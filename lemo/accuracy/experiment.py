"""An accuracy experiment file (workflows/accuracy/*.yaml): corpus, pretraining, fine-tuning, methods.

`methods` maps a label to method options (as the sweep's). The string "{predictors}" in an option is
replaced by the predictor directory, so the predictor-driven LeMo run names its predictors' path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import check_types, from_fields
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

    def method_options(self, label: str, predictors: Path | None = None) -> dict:
        if label not in self.methods:
            raise ValueError(f"unknown method label {label!r}; this experiment has {sorted(self.methods)}")
        text = json.dumps(self.methods[label])
        if "{predictors}" in text:
            if predictors is None:
                raise ValueError(f"method {label!r} uses trained predictors: pass --predictors DIR")
            text = text.replace("{predictors}", str(predictors))
        return json.loads(text)


SECTIONS = {"name", "corpus", "pretrain", "finetune", "methods", "predictors"}
CORPUS_KEYS = {"vocab_size": int, "heldout_fraction": float, "seed": int, "min_long": int}  # prepare_corpus
PREDICTOR_KEYS = {"context": int, "steps": int, "batch": int}  # lemo train-predictors


def _section(data, keys: dict, where: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    for k, v in data.items():
        if k not in keys:
            raise ValueError(f"{where}: unknown key {k!r}; known: {sorted(keys)}")
        number = keys[k] is float and isinstance(v, (int, float))
        if isinstance(v, bool) or not (isinstance(v, keys[k]) or number):
            raise ValueError(f"{where}: {k} must be {'a number' if keys[k] is float else 'an integer'}, got {v!r}")
    return data


def _config(cls, data, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    obj = from_fields(cls, data, where)
    try:
        check_types(obj)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return obj


def load_experiment(path: Path) -> Experiment:
    """Every section and key checked (unknown keys, wrong types, method options that do not build)."""
    from ..sweep import method_options

    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with sections {sorted(SECTIONS)}")
    unknown = set(data) - SECTIONS
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(map(str, unknown))}; known: {sorted(SECTIONS)}")
    missing = {"name", "pretrain", "finetune", "methods"} - set(data)
    if missing:
        raise ValueError(f"{path}: missing sections {sorted(missing)}")
    if not isinstance(data["methods"], dict) or not data["methods"]:
        raise ValueError(f"{path}: methods must map labels to methods, got {data['methods']!r}")
    for label, spec in data["methods"].items():
        method_options(spec, f"{path}: method {label!r}")
    return Experiment(name=str(data["name"]), corpus=_section(data.get("corpus", {}), CORPUS_KEYS, f"{path}: corpus"),
                      pretrain=_config(PretrainConfig, data["pretrain"], f"{path}: pretrain"),
                      finetune=_config(FinetuneConfig, data["finetune"], f"{path}: finetune"),
                      methods=data["methods"],
                      predictors=_section(data.get("predictors", {}), PREDICTOR_KEYS, f"{path}: predictors"))
