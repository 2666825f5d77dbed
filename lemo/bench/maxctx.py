"""Max trainable context: for one method, model and memory cap, the longest context one training step fits.

Every probe is one full training step: time is quadratic in context at long contexts, so the search
spends few probes there. It starts at `start` and doubles; once two probes fit, their peak memory
(allocated, linear in context) predicts the context that fills `margin` of the capacity (the cap, or
the device's memory) and the search jumps there; from a fit beyond the prediction it gallops upward
(+granularity, then twice that, ...). A jump never goes past the context whose step, scaled
quadratically from the last fit, would exceed `time_bound_s` (a longer one would not fit the runner's
command limit); when that leaves less than a quarter more context than the last fit, the search stops
with bound "time" rather than creep towards the bound in long probes.
After the first failure it bisects between the last fit and that failure at `granularity` tokens. So
every reported maximum is a fitting step, and (for memory bounds) a failing one `granularity` above it.
The probes are measured by the harness (lemo.bench.bench.JobRunner.measure: fresh setup, memory
freed and peak stats reset after) and written as ordinary records, so a failure is a data point. What
ended the search is the `bound`:

  memory    a probe ran out of device memory (under the cap, when one is set)
  host-ram  a probe exhausted host memory (an out-of-memory that is not torch.OutOfMemoryError while
            activations are offloaded to pinned host memory, or a Python MemoryError)
  killed    the process died during a probe (host OOM killer, or the runner's time limit): its record
            still says "started" when the search is run again
  time      the last fit took longer than time_bound_s, or a step a quarter longer is predicted not to
            stay within it
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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

BOUNDS = ("memory", "host-ram", "killed", "time", "limit", "error")
DEFAULT_SEARCH = dict(start=8192, limit=1048576, granularity=8192, time_bound_s=300.0, margin=0.95, caps_gib=[None])


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


def _round_down(x: float, granularity: int) -> int:
    return int(x) // granularity * granularity


def _memory_prediction(fits: list[Probe], capacity_gib: float | None, margin: float) -> float | None:
    """The context at which the line through the last two fits' peaks reaches margin * capacity."""
    if capacity_gib is None or len(fits) < 2:
        return None
    a, b = fits[-2], fits[-1]
    if a.peak_gib is None or b.peak_gib is None or b.peak_gib <= a.peak_gib:
        return None
    slope = (b.peak_gib - a.peak_gib) / (b.context - a.context)
    return b.context + (margin * capacity_gib - b.peak_gib) / slope


def _time_limit(fit: Probe, time_bound_s: float) -> float:
    """The longest context whose step, scaled quadratically from `fit`, stays within the bound."""
    if not fit.step_s:
        return math.inf
    return fit.context * math.sqrt(time_bound_s / fit.step_s)


def search_max_context(
    probe: Callable[[int], Probe],
    start: int,
    limit: int,
    granularity: int = 8192,
    time_bound_s: float = 300.0,
    capacity_gib: float | None = None,
    margin: float = 0.95,
) -> SearchResult:
    """Doubling (or a jump to the memory prediction), galloping, then bisection; see the module docstring."""
    if start <= 0 or start % granularity or limit < start:
        raise ValueError(
            f"need 0 < start <= limit and start a multiple of granularity; got start={start}, "
            f"limit={limit}, granularity={granularity}"
        )
    probes: list[Probe] = []
    fits: list[Probe] = []

    def run(ctx: int) -> Probe:
        p = probe(ctx)
        probes.append(p)
        return p

    def failure_bound(p: Probe) -> str:
        return {"oom": "memory", "host-oom": "host-ram", "killed": "killed"}.get(p.status, "error")

    ctx, bad, gallop = start, None, granularity
    while True:  # upward
        p = run(ctx)
        if p.status != "ok":
            bad = p
            break
        fits.append(p)
        if p.step_s is not None and p.step_s > time_bound_s:
            return SearchResult(ctx, "time", p, probes)
        if ctx >= limit:
            return SearchResult(ctx, "limit", p, probes)
        predicted = _memory_prediction(fits, capacity_gib, margin)
        if predicted is None:
            nxt = 2 * ctx
        elif predicted >= ctx + granularity:
            nxt = _round_down(predicted, granularity)
        else:  # at or past the prediction: gallop up to the failure
            nxt, gallop = ctx + gallop, 2 * gallop
        nxt = min(nxt, limit)
        by_time = _time_limit(p, time_bound_s)
        if by_time < nxt:  # the time bound binds: go there, unless that is less than a quarter further
            by_time = _round_down(by_time, granularity)
            if by_time < 1.25 * ctx:
                return SearchResult(ctx, "time", p, probes)
            nxt = by_time
        ctx = nxt
    best = fits[-1] if fits else None
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

    from lemo_baselines.attention import get_backend, unavailable_reason

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
            torch.cuda.set_per_process_memory_fraction(min(1.0, s.cap_gib * 2**30 / total), torch.cuda.current_device())
    model = build_model(
        s.point.model,
        context=settings["limit"],
        device=runner.device,
        dtype=runner.dtype,
        attn_implementation=get_backend(s.point.attention).hf_implementation,
        seed=s.point.seed,
    )
    from lemo_baselines.attention import set_model_backend

    set_model_backend(model, s.point.attention)

    def probe(ctx: int) -> Probe:
        p = dataclasses.replace(s.point, context=ctx, saved_bytes=False, profile=False)
        path = out_dir / record_name(p)
        if path.exists():  # resume: a recorded probe is not run again
            return _probe_from_record(json.loads(path.read_text()), p.offload_activations)
        write_record(path, {"point": p.as_dict(), "status": "started", "metrics": {}, "provenance": runner.provenance})
        return _probe_from_record(runner.measure(model, spec, p), p.offload_activations)

    capacity = s.cap_gib if s.cap_gib is not None else (None if total is None else total / 2**30)
    result = search_max_context(
        probe,
        settings["start"],
        settings["limit"],
        settings["granularity"],
        settings["time_bound_s"],
        capacity_gib=capacity,
        margin=settings["margin"],
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
