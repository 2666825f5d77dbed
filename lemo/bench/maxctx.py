"""Max trainable context: for one method, model and memory cap, the longest context one training step fits.

The search doubles the context from `start` until a probe fails (out of memory, host RAM exhausted by
offload, an error) or reaches `limit`, then bisects between the last fit and the first failure at
`granularity` tokens. Every probe is one full training step (the sweep's warm-up/steps) measured by
the harness (lemo.bench.bench.JobRunner.measure: fresh setup, memory freed and peak stats reset after),
and is written as an ordinary record, so a failure is a data point. A step slower than
`time_bound_s` still counts as a fit but stops the search upward (a longer one would not fit the
runner's command limit). What ended the search is the `bound`:

  memory    a probe ran out of device memory (under the cap, when one is set)
  host-ram  a probe exhausted host memory (an out-of-memory that is not torch.OutOfMemoryError while
            activations are offloaded to pinned host memory, or a Python MemoryError)
  killed    the process died during a probe (host OOM killer, or the runner's time limit): its record
            still says "started" when the search is run again
  time      the last fit took longer than time_bound_s
  limit     the search reached `limit` without failing
  error     a probe failed otherwise (its record says why)

A cap is `torch.cuda.set_per_process_memory_fraction(cap_gib / total)`: it bounds the caching
allocator, not the CUDA context. Re-running a search reuses the probes already recorded (resume after
a runner's time limit), whatever commit recorded them: delete the search directory to measure anew.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

BOUNDS = ("memory", "host-ram", "killed", "time", "limit", "error")
DEFAULT_SEARCH = dict(start=8192, limit=1048576, granularity=8192, time_bound_s=300.0, caps_gib=[None])


@dataclass
class Probe:
    context: int
    status: str  # ok | oom | host-oom | killed | error
    step_s: float | None = None
    peak_gib: float | None = None


@dataclass
class SearchResult:
    max_context: int  # 0 when even `start` failed
    bound: str
    best: Probe | None  # the probe at max_context
    probes: list = field(default_factory=list)  # in the order run


def _round_down(x: int, granularity: int) -> int:
    return x // granularity * granularity


def search_max_context(
    probe: Callable[[int], Probe], start: int, limit: int, granularity: int = 8192, time_bound_s: float = 300.0
) -> SearchResult:
    """Doubling from `start` (capped at `limit`), then bisection at `granularity`; see the module docstring."""
    if start <= 0 or start % granularity or limit < start:
        raise ValueError(
            f"need 0 < start <= limit and start a multiple of granularity; got start={start}, "
            f"limit={limit}, granularity={granularity}"
        )
    probes: list[Probe] = []
    best: Probe | None = None

    def run(ctx: int) -> Probe:
        p = probe(ctx)
        probes.append(p)
        return p

    def failure_bound(p: Probe) -> str:
        return {"oom": "memory", "host-oom": "host-ram", "killed": "killed"}.get(p.status, "error")

    ctx, bad = start, None
    while True:  # doubling
        p = run(ctx)
        if p.status != "ok":
            bad = p
            break
        best = p
        if p.step_s is not None and p.step_s > time_bound_s:
            return SearchResult(ctx, "time", best, probes)
        if ctx >= limit:
            return SearchResult(ctx, "limit", best, probes)
        ctx = min(2 * ctx, limit)
    lo, hi = (best.context if best else 0), bad.context
    while hi - lo > granularity:  # bisection between the last fit and the first failure
        mid = max(lo + granularity, _round_down((lo + hi) // 2, granularity))
        if mid >= hi:
            break
        p = run(mid)
        if p.status != "ok":
            hi, bad = mid, p
            continue
        lo, best = mid, p
        if p.step_s is not None and p.step_s > time_bound_s:
            return SearchResult(lo, "time", best, probes)
    return SearchResult(lo, failure_bound(bad), best, probes)


# ---- the sweep side: which searches a sweep defines, and running one on the GPU --------------------------------


@dataclass(frozen=True)
class Search:
    point: object  # lemo.bench.sweep.Point at the start context
    cap_gib: float | None

    @property
    def id(self) -> str:
        p = self.point
        cap = "full" if self.cap_gib is None else f"{self.cap_gib:g}gib"
        return f"{p.model}__{p.attention}__gc{int(p.gradient_checkpointing)}__{p.method}__{cap}"


def search_settings(sweep: dict) -> dict:
    settings = {**DEFAULT_SEARCH, **(sweep.get("max_context") or {})}
    unknown = set(settings) - set(DEFAULT_SEARCH)
    if unknown:
        raise ValueError(f"max_context has unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_SEARCH)}")
    return settings


def searches(sweep: dict) -> list[Search]:
    """One search per sweep point (its context is ignored: the search starts at `start`) and cap."""
    from .sweep import expand

    caps = search_settings(sweep)["caps_gib"]
    seen, out = set(), []
    for p in expand(sweep):
        for cap in caps:
            s = Search(p, None if cap is None else float(cap))
            if s.id not in seen:
                seen.add(s.id)
                out.append(s)
    return out


def find_search(sweep: dict, search_id: str) -> Search:
    for s in searches(sweep):
        if s.id == search_id:
            return s
    raise ValueError(f"no search {search_id!r}; searches: {[s.id for s in searches(sweep)]}")


def _probe_from_record(rec: dict, offload: bool) -> Probe:
    m = rec.get("metrics") or {}
    status, kind = rec["status"], rec.get("error_type")
    if status == "started":  # written before the step: the process died during it
        status = "killed"
    elif kind == "MemoryError" or (status == "oom" and offload and kind != "OutOfMemoryError"):
        status = "host-oom"  # host memory (pinned buffers of the offloaded activations) ran out, not the GPU's
    return Probe(rec["point"]["context"], status, m.get("step_s"), m.get("peak_allocated_gib"))


def run_search(sweep: dict, search_id: str, out_dir: Path, log=log.info) -> dict:
    """Run (or resume) one search on this machine; writes a record per probe and result.json in `out_dir`."""
    import torch

    from baselines.attention import get_backend, unavailable_reason

    from ..models.registry import build_model, get_spec
    from .bench import JobRunner, write_record
    from .sweep import Job, record_name

    s, settings = find_search(sweep, search_id), search_settings(sweep)
    out_dir = Path(out_dir)
    runner = JobRunner(Job(s.point.model, s.point.attention, s.point.gradient_checkpointing, [s.point]), out_dir, log)
    spec = get_spec(s.point.model)
    head_dim = spec.fields["hidden_size"] // spec.fields["num_attention_heads"]
    gqa = (
        spec.fields.get("num_key_value_heads", spec.fields["num_attention_heads"]) != spec.fields["num_attention_heads"]
    )
    problem = unavailable_reason(s.point.attention, runner.device, runner.dtype, head_dim, gqa)
    if problem:
        raise RuntimeError(f"{s.point.attention}: {problem}")
    total = None
    if runner.device.type == "cuda":
        total = torch.cuda.get_device_properties(runner.device).total_memory
        if s.cap_gib is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, s.cap_gib * 2**30 / total), runner.device)
    model = build_model(
        s.point.model,
        context=settings["limit"],
        device=runner.device,
        dtype=runner.dtype,
        attn_implementation=get_backend(s.point.attention).hf_implementation,
        seed=s.point.seed,
    )
    from baselines.attention import set_model_backend

    set_model_backend(model, s.point.attention)

    def probe(ctx: int) -> Probe:
        p = dataclasses.replace(s.point, context=ctx, saved_bytes=False, profile=False)
        path = out_dir / record_name(p)
        if path.exists():  # resume: a recorded probe is not run again
            return _probe_from_record(json.loads(path.read_text()), p.offload_activations)
        write_record(path, {"point": p.as_dict(), "status": "started", "metrics": {}, "provenance": runner.provenance})
        return _probe_from_record(runner.measure(model, spec, p), p.offload_activations)

    result = search_max_context(
        probe, settings["start"], settings["limit"], settings["granularity"], settings["time_bound_s"]
    )
    best = result.best
    out = {
        "search": s.id,
        "model": s.point.model,
        "method": s.point.method,
        "method_name": s.point.method_name,
        "attention": s.point.attention,
        "gradient_checkpointing": s.point.gradient_checkpointing,
        "cap_gib": s.cap_gib,
        "device_total_gib": None if total is None else total / 2**30,
        "max_context": result.max_context,
        "bound": result.bound,
        "step_s": best.step_s if best else None,
        "peak_gib": best.peak_gib if best else None,
        "probes": [dataclasses.asdict(p) for p in result.probes],
        "settings": settings,
        "options": s.point.options,
        "provenance": runner.provenance,
    }
    write_record(out_dir / "result.json", out)
    log(f"[{s.id}] max context {result.max_context} ({result.bound})")
    return out
