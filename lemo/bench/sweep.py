"""Sweep definitions: a YAML file -> validated points, grouped into jobs (one model build each).

A sweep names its methods (label -> method + options) and lists groups; each group is a product of
models x attention backends x contexts x methods at one checkpointing setting. All points sharing
(model, attention backend, checkpointing) form one job: one process and one model build, every
method measured side by side on the same machine and model instance. A group with `one_process: true`
puts all its backends in one job instead (job id MODEL__A+B__gcN): the model switches backend per
point, so methods on different backends share the process too (e.g. LoRA on cuDNN beside LeMo on flash).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from lemo_baselines.attention import BACKENDS

from ..models.registry import REGISTRY
from .methods import METHODS
from .yamlfile import load_yaml

DEFAULTS = dict(device="cuda", dtype="bfloat16", batch_size=1, warmup=1, steps=3, seed=0)
# kind: distributed = multi-GPU points (lemo.distributed); max_context: a max-context search (lemo.bench.maxctx)
TOP_KEYS = {"name", "lora", "methods", "groups", "kernel_benchmarks", "kind", "max_context", *DEFAULTS}
DISTRIBUTED_GROUP_KEYS = {"parallelism", "gpus"}
GROUP_KEYS = {"models", "attention", "gradient_checkpointing", "contexts", "methods"}  # required
GROUP_OPTIONAL = {"warmup", "steps", "batch_size", "profile", "saved_bytes", "one_process"}
# Keys of a method entry: the method, its options, and `offload_activations` (saved tensors, under
# checkpointing the layer inputs, kept in host memory during the step; see lemo.bench.measure.offloading).
# `liger`: Liger-Kernel under lora-liger or lemo (true or a dict of lemo_baselines.liger.LigerOptions).
# `calibrate` (lemo): token counts at which lemo.crossover times sparse against dense steps to choose
# min_sparse_tokens, once per job (the record keeps the choice and the timings).
METHOD_KEYS = {"method", "lora", "lemo", "longlora", "liger", "offload_activations", "calibrate"}
OPTION_KEYS = {
    "lora": {"lora"},
    "lemo": {"lora", "lemo", "liger", "calibrate"},
    "longlora": {"lora", "longlora"},
    "lora-liger": {"lora", "liger"},
}  # per method


def _int(lo: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"an integer >= {lo}"


_BOOL = (lambda v: isinstance(v, bool), "true or false")
# Settings: (accepts, what is allowed). steps: 0 would leave nothing to take the median of.
SETTINGS = {
    "batch_size": _int(1),
    "warmup": _int(0),
    "steps": _int(1),
    "seed": _int(0),
    "profile": _BOOL,
    "saved_bytes": _BOOL,
    "gradient_checkpointing": _BOOL,
    "one_process": _BOOL,
    "device": (lambda v: v in ("cuda", "cpu"), "'cuda' or 'cpu'"),
    "dtype": (lambda v: v in ("bfloat16", "float16", "float32"), "bfloat16, float16 or float32"),
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
}


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
    job_attention: str = ""  # "a+b" when a one_process group measures several backends in one job

    @property
    def job_key(self) -> tuple:
        return (self.model, self.job_attention or self.attention, self.gradient_checkpointing)

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
    sweep = load_yaml(path)
    validate_sweep(sweep, str(path))
    return sweep


def _setting(where: str, key: str, value) -> None:
    accepts, what = SETTINGS[key]
    if not accepts(value):
        raise ValueError(f"{where}: {key} must be {what}, got {value!r}")


def _unknown(where: str, data: dict, known: set) -> None:
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(map(str, unknown))}; known: {sorted(known)}")


def method_options(spec: dict, where: str, default_lora: dict | None = None) -> None:
    """A method entry ({method, options...}) whose options build: unknown or mistyped options fail here,
    before any model is built."""
    from lemo_baselines.longlora import LongLoraOptions
    from lemo_baselines.lora import LoraOptions

    from ..config import LeMoConfig, check_types, from_fields

    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping with a `method`, got {spec!r}")
    if not isinstance(spec.get("method"), str) or spec["method"] not in METHODS:
        raise ValueError(f"{where} runs unknown method {spec.get('method')!r}; known: {list(METHODS)}")
    _unknown(where, spec, METHOD_KEYS)
    allowed = OPTION_KEYS[spec["method"]]
    extra = set(spec) & (METHOD_KEYS - allowed - {"method", "offload_activations"})
    if extra:
        raise ValueError(
            f"{where}: method {spec['method']!r} takes no {sorted(extra)} options (it takes {sorted(allowed)})"
        )
    if not isinstance(spec.get("offload_activations", False), bool):
        raise ValueError(f"{where}: offload_activations must be true or false")
    kinds = {"lora": LoraOptions, "lemo": LeMoConfig, "longlora": LongLoraOptions}
    calibrate = spec.get("calibrate", [])
    if not isinstance(calibrate, list) or not all(_int(1)[0](n) for n in calibrate):
        raise ValueError(f"{where}: calibrate must be a list of token counts (integers >= 1), got {calibrate!r}")
    if "liger" in spec:
        from .methods import liger_options

        try:
            liger_options(spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err
    for key in sorted(allowed - {"liger", "calibrate"}):
        data = spec.get(key, (default_lora or {}) if key == "lora" else {})
        if not isinstance(data, dict):
            raise ValueError(f"{where}: {key} options must be a mapping, got {data!r}")
        try:
            opts = from_fields(kinds[key], data, f"{key} options")
            check_types(opts)
            if key == "lora":
                opts.target_modules("llama")  # the letters of q, k, v, o
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err


def validate_sweep(sweep: dict, where: str = "sweep") -> None:
    """Every key known and every value of the right type, or a ValueError naming the key and value."""
    if not isinstance(sweep, dict):
        raise ValueError(f"{where}: expected a mapping of sweep settings, got {type(sweep).__name__}")
    _unknown(where, sweep, TOP_KEYS)
    distributed = sweep.get("kind") == "distributed"
    if sweep.get("kind", "distributed") != "distributed":
        raise ValueError(f"{where}: kind must be 'distributed' (multi-GPU points) or absent, got {sweep['kind']!r}")
    for key in ("name", *DEFAULTS):
        if key in sweep or key == "name":
            _setting(where, key, sweep.get(key))
    if not isinstance(sweep.get("lora", {}), dict):
        raise ValueError(f"{where}: lora (the default LoRA options) must be a mapping, got {sweep['lora']!r}")
    methods = sweep.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"{where}: `methods` must map labels to methods, got {methods!r}")
    for label, spec in methods.items():
        method_options(spec, f"{where}: method {label!r}", sweep.get("lora"))
    groups = sweep.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"{where}: `groups` must be a non-empty list, got {groups!r}")
    for i, group in enumerate(groups):
        at = f"{where}: group {i}"
        if not isinstance(group, dict):
            raise ValueError(f"{at}: expected a mapping, got {group!r}")
        _unknown(at, group, GROUP_KEYS | GROUP_OPTIONAL | (DISTRIBUTED_GROUP_KEYS if distributed else set()))
        missing = GROUP_KEYS - set(group)
        if missing:
            raise ValueError(f"{at}: missing keys {sorted(missing)}")
        for key in GROUP_KEYS - {"gradient_checkpointing"}:
            if not isinstance(group[key], list) or not group[key]:
                raise ValueError(f"{at}: {key} must be a non-empty list, got {group[key]!r}")
        for key in GROUP_OPTIONAL | {"gradient_checkpointing"}:
            if key in group:
                _setting(at, key, group[key])
        for m in group["models"]:
            if not isinstance(m, str) or m not in REGISTRY:
                raise ValueError(f"{at}: unknown model {m!r}; known: {sorted(REGISTRY)}")
        for a in group["attention"]:
            if not isinstance(a, str) or a not in BACKENDS:
                raise ValueError(f"{at}: unknown attention backend {a!r}; known: {list(BACKENDS)}")
        for label in group["methods"]:
            if not isinstance(label, str) or label not in methods:
                raise ValueError(f"{at}: method {label!r} is not defined under methods: {list(methods)}")
        if not isinstance(group.get("one_process", False), bool):
            raise ValueError(f"{at}: one_process must be true or false")
        for c in group["contexts"]:
            if not isinstance(c, int) or isinstance(c, bool) or c < 2:
                raise ValueError(f"{at}: context {c!r} must be an integer >= 2 (tokens; a next-token loss needs 2)")
    kernels = sweep.get("kernel_benchmarks", [])
    if not isinstance(kernels, list) or not all(isinstance(k, str) for k in kernels):
        raise ValueError(f"{where}: kernel_benchmarks must be a list of names, got {sweep['kernel_benchmarks']!r}")


def expand(sweep: dict) -> list[Point]:
    """Every point of the sweep, in a stable order; duplicates are an error."""
    base = {**DEFAULTS, **{k: sweep[k] for k in DEFAULTS if k in sweep}}
    points, seen = [], set()
    for group in sweep["groups"]:
        overrides = {k: group[k] for k in ("warmup", "steps", "batch_size", "profile", "saved_bytes") if k in group}
        if group.get("one_process") and len(group["attention"]) > 1:
            overrides["job_attention"] = "+".join(group["attention"])
        for model in group["models"]:
            for attention in group["attention"]:
                for context in sorted(int(c) for c in group["contexts"]):
                    for label in group["methods"]:
                        spec = sweep["methods"][label]
                        options = {k: v for k, v in spec.items() if k != "method"}
                        if "lora" in sweep and "lora" not in options:
                            options["lora"] = sweep["lora"]
                        p = Point(
                            model=model,
                            attention=attention,
                            gradient_checkpointing=bool(group["gradient_checkpointing"]),
                            context=context,
                            method=label,
                            method_name=spec["method"],
                            options=options,
                            **{**base, **overrides},
                        )
                        if p.key() in seen:
                            raise ValueError(f"point {p.key()} appears twice in the sweep")
                        seen.add(p.key())
                        points.append(p)
    return points


def jobs(sweep: dict) -> list[Job]:
    """Points grouped by (model, attention, checkpointing), ordered by context, then method (one_process
    groups: by their backends together)."""
    if sweep.get("kind") == "distributed":  # its points carry a parallelism and world size: lemo.distributed
        raise ValueError(
            f"sweep {sweep.get('name')!r} is a multi-GPU sweep: run it with `lemo dist-bench` "
            "(Snakemake does, one torchrun per point)"
        )
    by_key: dict[tuple, Job] = {}
    for p in sorted(expand(sweep), key=lambda p: p.context):
        by_key.setdefault(p.job_key, Job(*p.job_key, points=[])).points.append(p)
    return list(by_key.values())


def find_job(sweep: dict, job_id: str) -> Job:
    for job in jobs(sweep):
        if job.id == job_id:
            return job
    raise ValueError(f"no job {job_id!r} in the sweep; jobs: {[j.id for j in jobs(sweep)]}")


def record_name(p: Point) -> str:
    return f"{p.attention}__{p.method}__{p.context}__b{p.batch_size}.json"
