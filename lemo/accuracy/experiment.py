"""An accuracy experiment file (workflows/accuracy/*.yaml): corpus, pretraining, fine-tuning, methods.

`methods` maps a label to method options (as the sweep's). The string "{predictors}" in an option is
replaced by the predictor directory, so the predictor-driven LeMo run names its predictors' path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..bench.yamlfile import load_yaml
from ..config import typed_from_mapping
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
    fidelity: dict | None = None  # {rope_factors: {factor: [contexts]}, windows, variants: {label: LeMo options}}
    model: str | None = None  # a pretrained registry name (lemo.models.pretrained): no pretraining

    def method_options(self, label: str, predictors: Path | None = None) -> dict:
        if label not in self.methods:
            raise ValueError(f"unknown method label {label!r}; this experiment has {sorted(self.methods)}")
        text = json.dumps(self.methods[label])
        if "{predictors}" in text:
            if predictors is None:
                raise ValueError(f"method {label!r} uses trained predictors: pass --predictors DIR")
            text = text.replace("{predictors}", str(predictors))
        return json.loads(text)


SECTIONS = {"name", "corpus", "pretrain", "finetune", "methods", "predictors", "fidelity", "model"}
CORPUS_KEYS = {
    "vocab_size": int,
    "heldout_fraction": float,
    "seed": int,
    "min_long": int,
    "sources": list,
    "long_tokens": int,
    "max_doc_tokens": int,
    "max_train_tokens": int,
}  # prepare_corpus
PREDICTOR_KEYS = {
    "context": int,
    "steps": int,
    "batch": int,  # lemo train-predictors
    "sparse_layers": list,
    "target_recall": float,
}  # and eval-predictors


def _section(data, keys: dict, where: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    for k, v in data.items():
        if k not in keys:
            raise ValueError(f"{where}: unknown key {k!r}; known: {sorted(keys)}")
        number = keys[k] is float and isinstance(v, (int, float))
        if isinstance(v, bool) or not (isinstance(v, keys[k]) or number):
            kind = {float: "a number", list: "a list", int: "an integer"}.get(keys[k], keys[k].__name__)
            raise ValueError(f"{where}: {k} must be {kind}, got {v!r}")
    return data


def _fidelity(data, where: str) -> dict | None:
    """The fidelity section: windows, {rope factor: [contexts]}, {label: LeMo options} (each must build)."""
    from ..config import LeMoConfig

    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - {"windows", "rope_factors", "variants"} or "variants" not in data:
        raise ValueError(f"{where}: expected keys windows, rope_factors, variants; got {data!r}")
    factors = data.get("rope_factors")
    if (
        not isinstance(factors, dict)
        or not factors
        or not all(isinstance(c, list) and c and all(isinstance(x, int) and x > 0 for x in c) for c in factors.values())
    ):
        raise ValueError(f"{where}: rope_factors must map a factor to a list of contexts, got {factors!r}")
    for label, options in data["variants"].items():
        try:
            LeMoConfig.from_dict(options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: variant {label!r}: {err}") from err
    return data


def load_experiment(path: Path) -> Experiment:
    """Every section and key checked (unknown keys, wrong types, method options that do not build)."""
    from ..bench.sweep import method_options

    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with sections {sorted(SECTIONS)}")
    unknown = set(data) - SECTIONS
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(map(str, unknown))}; known: {sorted(SECTIONS)}")
    missing = {"name", "finetune", "methods"} - set(data)
    if missing:
        raise ValueError(f"{path}: missing sections {sorted(missing)}")
    if ("pretrain" in data) == ("model" in data):
        raise ValueError(f"{path}: give either `pretrain` (a model to pretrain) or `model` (a pretrained one)")
    if "model" in data:
        from ..models.pretrained import get_pretrained

        get_pretrained(data["model"])  # unknown names fail here, naming the known ones
    if not isinstance(data["methods"], dict) or not data["methods"]:
        raise ValueError(f"{path}: methods must map labels to methods, got {data['methods']!r}")
    for label, spec in data["methods"].items():
        method_options(spec, f"{path}: method {label!r}")
    return Experiment(
        name=str(data["name"]),
        corpus=_section(data.get("corpus", {}), CORPUS_KEYS, f"{path}: corpus"),
        pretrain=typed_from_mapping(PretrainConfig, data.get("pretrain", {}), f"{path}: pretrain"),
        finetune=typed_from_mapping(FinetuneConfig, data["finetune"], f"{path}: finetune"),
        methods=data["methods"],
        predictors=_section(data.get("predictors", {}), PREDICTOR_KEYS, f"{path}: predictors"),
        fidelity=_fidelity(data.get("fidelity"), f"{path}: fidelity"),
        model=data.get("model"),
    )
