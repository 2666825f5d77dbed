"""Sweep definitions: a YAML file -> validated points, grouped into jobs (one model build each).

A sweep names its methods (label -> method + options) and lists groups; each group is a product of
models x attention backends x contexts x methods at one checkpointing setting. All points sharing
(model, attention backend, checkpointing) form one job: one process and one model build, every
method measured side by side on the same machine and model instance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from baselines.attention import BACKENDS

from .methods import METHODS
from .models.registry import REGISTRY

DEFAULTS = dict(device="cuda", dtype="bfloat16", batch_size=1, warmup=1, steps=3, seed=0)
# Keys of a method entry: the method, its options, and `offload_activations` (saved tensors, under
# checkpointing the layer inputs, kept in host memory during the step; see lemo.measure.offloading).
METHOD_KEYS = {"method", "lora", "lemo", "longlora", "offload_activations"}


@dataclass(frozen=True)
class Point:
    model: str
    attention: str
    gradient_checkpointing: bool
    context: int
    method: str  # label in the sweep, e.g. "lemo-channel"
    method_name: str  # the Method it runs, e.g. "lemo"
    options: dict = field(hash=False, compare=False)
    batch_size: int = 1
    warmup: int = 1
    steps: int = 3
    dtype: str = "bfloat16"
    device: str = "cuda"
    seed: int = 0
    profile: bool = False
    saved_bytes: bool = True

    @property
    def offload_activations(self) -> bool:
        return bool(self.options.get("offload_activations", False))

    def key(self) -> tuple:
        return (self.model, self.attention, self.gradient_checkpointing, self.method, self.context, self.batch_size)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Job:
    model: str
    attention: str
    gradient_checkpointing: bool
    points: list

    @property
    def id(self) -> str:
        return f"{self.model}__{self.attention}__gc{int(self.gradient_checkpointing)}"


def load_sweep(path: str | Path) -> dict:
    with open(path) as f:
        sweep = yaml.safe_load(f)
    validate_sweep(sweep, str(path))
    return sweep


def validate_sweep(sweep: dict, where: str = "sweep") -> None:
    methods = sweep.get("methods") or {}
    for label, spec in methods.items():
        if spec.get("method") not in METHODS:
            raise ValueError(f"{where}: method {label!r} runs unknown method {spec.get('method')!r}; known: {list(METHODS)}")
        unknown = set(spec) - METHOD_KEYS
        if unknown:
            raise ValueError(f"{where}: method {label!r} has unknown keys {sorted(unknown)}; known: {sorted(METHOD_KEYS)}")
        if not isinstance(spec.get("offload_activations", False), bool):
            raise ValueError(f"{where}: method {label!r}: offload_activations must be true or false")
    for i, group in enumerate(sweep.get("groups") or []):
        for m in group["models"]:
            if m not in REGISTRY:
                raise ValueError(f"{where}: group {i}: unknown model {m!r}; known: {sorted(REGISTRY)}")
        for a in group["attention"]:
            if a not in BACKENDS:
                raise ValueError(f"{where}: group {i}: unknown attention backend {a!r}; known: {list(BACKENDS)}")
        for label in group["methods"]:
            if label not in methods:
                raise ValueError(f"{where}: group {i}: method {label!r} is not defined under methods: {list(methods)}")
        for c in group["contexts"]:
            if int(c) < 2:
                raise ValueError(f"{where}: group {i}: context {c} too short (need >= 2 tokens for a next-token loss)")


def expand(sweep: dict) -> list[Point]:
    """Every point of the sweep, in a stable order; duplicates are an error."""
    base = {**DEFAULTS, **{k: sweep[k] for k in DEFAULTS if k in sweep}}
    points, seen = [], set()
    for group in sweep["groups"]:
        overrides = {k: group[k] for k in ("warmup", "steps", "batch_size", "profile", "saved_bytes") if k in group}
        for model in group["models"]:
            for attention in group["attention"]:
                for context in sorted(int(c) for c in group["contexts"]):
                    for label in group["methods"]:
                        spec = sweep["methods"][label]
                        options = {k: v for k, v in spec.items() if k != "method"}
                        if "lora" in sweep and "lora" not in options:
                            options["lora"] = sweep["lora"]
                        p = Point(model=model, attention=attention,
                                  gradient_checkpointing=bool(group["gradient_checkpointing"]), context=context,
                                  method=label, method_name=spec["method"], options=options,
                                  **{**base, **overrides})
                        if p.key() in seen:
                            raise ValueError(f"point {p.key()} appears twice in the sweep")
                        seen.add(p.key())
                        points.append(p)
    return points


def jobs(sweep: dict) -> list[Job]:
    """Points grouped by (model, attention, checkpointing), ordered by context, then method."""
    if sweep.get("kind") == "distributed":  # its points carry a parallelism and world size: lemo.distributed
        raise ValueError(f"sweep {sweep.get('name')!r} is a multi-GPU sweep: run it with `lemo dist-bench` "
                         "(Snakemake does, one torchrun per point)")
    by_key: dict[tuple, Job] = {}
    for p in sorted(expand(sweep), key=lambda p: p.context):
        key = (p.model, p.attention, p.gradient_checkpointing)
        by_key.setdefault(key, Job(*key, points=[])).points.append(p)
    return list(by_key.values())


def find_job(sweep: dict, job_id: str) -> Job:
    for job in jobs(sweep):
        if job.id == job_id:
            return job
    raise ValueError(f"no job {job_id!r} in the sweep; jobs: {[j.id for j in jobs(sweep)]}")


def record_name(p: Point) -> str:
    return f"{p.attention}__{p.method}__{p.context}__b{p.batch_size}.json"
