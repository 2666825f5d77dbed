"""Multi-GPU sweep points (`kind: distributed` sweep files, e.g. workflows/sweeps/h200-multigpu.yaml).

A group adds `parallelism` (ddp | fsdp2 | sp) and `gpus` (world sizes) to the usual models x attention x
contexts x methods. For ddp/fsdp2 the context is per GPU (each rank trains its own sequence); for sp it
is the whole sequence, split over the GPUs. One point = one torchrun launch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..bench.sweep import DEFAULTS

PARALLELISMS = ("ddp", "fsdp2", "sp")


@dataclass(frozen=True)
class DistPoint:
    parallelism: str
    gpus: int
    model: str
    attention: str
    gradient_checkpointing: bool
    context: int
    method: str  # label in the sweep
    method_name: str  # lora | lemo
    options: dict = field(hash=False, compare=False)
    dtype: str = "bfloat16"
    device: str = "cuda"
    warmup: int = 1
    steps: int = 3
    seed: int = 0

    @property
    def id(self) -> str:
        return (
            f"{self.parallelism}__g{self.gpus}__{self.model}__{self.attention}__gc{int(self.gradient_checkpointing)}"
            f"__{self.method}__{self.context}"
        )

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on, over all ranks."""
        return self.context * (1 if self.parallelism == "sp" else self.gpus)

    def as_dict(self) -> dict:
        return asdict(self)


def is_distributed(sweep: dict) -> bool:
    return sweep.get("kind") == "distributed"


def dist_points(sweep: dict) -> list[DistPoint]:
    base = {k: sweep[k] for k in ("dtype", "device", "warmup", "steps", "seed") if k in sweep}
    base = {**{k: DEFAULTS[k] for k in ("dtype", "device", "warmup", "steps", "seed")}, **base}
    points, seen = [], set()
    for i, group in enumerate(sweep["groups"]):
        par = group.get("parallelism")
        if par not in PARALLELISMS:
            raise ValueError(f"group {i}: parallelism must be one of {PARALLELISMS}, got {par!r}")
        for gpus in group["gpus"]:
            for model in group["models"]:
                for attention in group["attention"]:
                    for context in sorted(int(c) for c in group["contexts"]):
                        for label in group["methods"]:
                            spec = sweep["methods"][label]
                            if spec["method"] not in ("lora", "lemo"):
                                raise ValueError(
                                    f"group {i}: distributed points run lora or lemo, not {spec['method']}"
                                )
                            options = {k: v for k, v in spec.items() if k != "method"}
                            if "lora" in sweep and "lora" not in options:
                                options["lora"] = sweep["lora"]
                            p = DistPoint(
                                par,
                                int(gpus),
                                model,
                                attention,
                                bool(group["gradient_checkpointing"]),
                                context,
                                label,
                                spec["method"],
                                options,
                                **base,
                            )
                            if p.id in seen:
                                raise ValueError(f"point {p.id} appears twice")
                            seen.add(p.id)
                            points.append(p)
    return points


def find_point(sweep: dict, point_id: str) -> DistPoint:
    for p in dist_points(sweep):
        if p.id == point_id:
            return p
    raise ValueError(f"no point {point_id!r} in the sweep")
