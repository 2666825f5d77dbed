"""Regression check: ratios between methods in a results CSV, each held to a committed bound.

A thresholds file lists checks; each compares `method` with `baseline` on `metric` at matching
points (model, attention, checkpointing, context) and fails when the ratio baseline/method (or
method/baseline for higher-is-better metrics) leaves [min, max]. A check that matches no point
fails too: a silently empty check is no check.

`baseline: strongest-lora` compares instead with the strongest LoRA-family row of the point in the
same run (lowest value on any backend: lora, lora-liger, offloaded or not; results.strongest_ratios),
taking `method` on its best backend per point: the targets table's ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import yaml

from .results import ratios, strongest_ratios

STRONGEST = "strongest-lora"


@dataclass
class Check:
    name: str
    metric: str
    method: str
    baseline: str = "lora"
    higher_is_better: bool = False
    min: float | None = None
    max: float | None = None
    model: str | None = None
    gradient_checkpointing: bool | None = None
    min_context: int | None = None


def load_checks(path) -> list[Check]:
    with open(path) as f:
        data = yaml.safe_load(f)
    return [Check(**c) for c in data["checks"]]


def run_checks(frame: pd.DataFrame, checks: list[Check]) -> list[str]:
    """Failure messages (empty = all pass); also prints one line per checked ratio."""
    failures = []
    for c in checks:
        if c.baseline == STRONGEST:
            if c.higher_is_better:
                raise ValueError(f"{c.name}: {STRONGEST} compares lower-is-better metrics (memory, time) only")
            r = strongest_ratios(frame, c.metric, same_run=True)
            r = r[r.method == c.method].sort_values("ratio")
            r = r.groupby(["model", "gradient_checkpointing", "context", "batch_size", "git_commit"]).tail(1)
        else:
            r = ratios(frame, c.metric, c.baseline, c.higher_is_better)
            r = r[r.method == c.method]
        if c.model is not None:
            r = r[r.model == c.model]
        if c.gradient_checkpointing is not None:
            r = r[r.gradient_checkpointing == c.gradient_checkpointing]
        if c.min_context is not None:
            r = r[r.context >= c.min_context]
        if r.empty:
            failures.append(f"{c.name}: no matching points for {c.method} vs {c.baseline} on {c.metric}")
            continue
        for _, row in r.iterrows():
            ok = (c.min is None or row.ratio >= c.min) and (c.max is None or row.ratio <= c.max)
            line = (f"{c.name}: {row.model} {row.attention} gc={row.gradient_checkpointing} ctx={row.context}: "
                    f"{c.baseline}/{c.method} {c.metric} ratio {row.ratio:.3f} bounds [{c.min}, {c.max}]")
            print(("ok   " if ok else "FAIL ") + line)
            if not ok:
                failures.append(line)
    return failures
