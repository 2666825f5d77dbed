"""Regression check: ratios between methods in a results CSV, each held to a committed bound.

A thresholds file names the sweep it checks and lists checks; each compares `method` with `baseline`
on `metric` and fails when the ratio baseline/method (or method/baseline for higher-is-better
metrics) leaves [min, max]. A check covers an exact set of points (model, attention, checkpointing,
context, batch): every point of the sweep that runs `method`, narrowed by the check's filters, plus
any such point found in the CSV. Each covered point must have an ok record of both methods: a missing,
out-of-memory, errored or skipped point fails the check, except that a baseline out of memory where the
method fits is a win, printed as one. A check that covers no point fails too: a silently empty check
is no check.

`baseline: strongest-lora` compares instead with the strongest LoRA-family row of the point (lowest
value on any backend: lora, lora-liger, offloaded or not), taking `method` on its best backend: the
targets table's ratio. Its points are (model, checkpointing, context, batch), any backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from ..config import check_types
from .results import LORA_FAMILY, POINT_COLS, wide
from .yamlfile import load_yaml

KEYS = ["model", "attention", "gradient_checkpointing", "context", "batch_size"]  # a point, without the method
TOP_KEYS = {"checks", "sweep"}
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
    attention: str | None = None
    gradient_checkpointing: bool | None = None
    min_context: int | None = None
    max_context: int | None = None

    def __post_init__(self):
        check_types(self)
        if self.min is None and self.max is None:
            raise ValueError(f"check {self.name!r}: give min and/or max (a check without bounds checks nothing)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"check {self.name!r}: min {self.min} > max {self.max}")
        if self.method == self.baseline:
            raise ValueError(f"check {self.name!r}: method and baseline are both {self.method!r}")

    def covers(self, model: str, attention: str, gradient_checkpointing: bool, context: int) -> bool:
        return (
            (self.model is None or model == self.model)
            and (self.attention is None or attention == self.attention)
            and (self.gradient_checkpointing is None or bool(gradient_checkpointing) == self.gradient_checkpointing)
            and (self.min_context is None or context >= self.min_context)
            and (self.max_context is None or context <= self.max_context)
        )


def load_thresholds(path) -> tuple[list[Check], Path | None]:
    """The checks of a thresholds file and the sweep it names (relative to the file), validated."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with keys {sorted(TOP_KEYS)}, got {type(data).__name__}")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    raw = data.get("checks")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: `checks` must be a non-empty list (an empty gate passes anything), got {raw!r}")
    known = [f.name for f in fields(Check)]
    checks = []
    for i, c in enumerate(raw):
        where = f"{path}: checks[{i}]" + (f" ({c.get('name')})" if isinstance(c, dict) and "name" in c else "")
        if not isinstance(c, dict):
            raise ValueError(f"{where}: expected a mapping, got {c!r}")
        missing = [k for k in ("name", "metric", "method") if k not in c]
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        bad = set(c) - set(known)
        if bad:
            raise ValueError(f"{where}: unknown keys {sorted(bad)}; known: {known}")
        try:
            checks.append(Check(**c))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: check names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    sweep = data.get("sweep")
    if sweep is not None and not isinstance(sweep, str):
        raise ValueError(f"{path}: `sweep` must be a path (relative to this file), got {sweep!r}")
    return checks, (Path(os.path.normpath(Path(path).parent / sweep)) if sweep else None)


def load_checks(path) -> list[Check]:
    return load_thresholds(path)[0]


def read_results(path) -> pd.DataFrame:
    """A sweep CSV (lemo aggregate), refusing empty, header-only and foreign files by name."""
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file (no header, no rows); expected `lemo aggregate` output") from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from err
    missing = [c for c in POINT_COLS + ["status", "metric", "value"] if c not in frame]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected `lemo aggregate` output")
    if frame.empty:
        raise ValueError(f"{path}: no rows (header only): nothing was measured")
    return frame


def _outcome(rows: pd.DataFrame, metric: str) -> tuple[str, float | None, str]:
    """(status, metric value, description) of one method at one point; status 'missing' without a record."""
    if rows.empty:
        return "missing", None, "missing (no record)"
    if len(rows) > 1:
        return "duplicate", None, f"{len(rows)} records (aggregate one run)"
    row = rows.iloc[0]
    value = row.get(metric)
    value = None if value is None or pd.isna(value) else float(value)
    status = row.status
    if status == "skipped" and str(row.get("reason", "")).startswith("out of memory"):
        status = "oom"  # an earlier context ran out of memory, so this one was not tried
    if status == "ok" and value is None:
        return "no-metric", None, f"ok but no {metric}"
    reason = row.get("reason")
    return status, value, status + (f" ({reason})" if isinstance(reason, str) and reason and reason != status else "")


def _best(rows: pd.DataFrame, metric: str) -> tuple[str, float | None, str]:
    """The lowest ok value among rows (one per method x backend), or the first row's failure."""
    ok = rows[(rows.status == "ok") & rows[metric].notna()] if metric in rows else rows.iloc[0:0]
    if not ok.empty:
        row = ok.loc[ok[metric].idxmin()]
        return "ok", float(row[metric]), f"{row.method}/{row.attention}"
    if rows.empty:
        return "missing", None, "missing (no record)"
    return _outcome(rows.iloc[:1], metric)


def run_checks(frame: pd.DataFrame, checks: list[Check], expected=None) -> list[str]:
    """Failure lines (empty = all pass); prints one line per covered point. `expected`: the sweep's
    Points (lemo.bench.sweep.expand), so that a point or a whole job absent from the CSV is noticed."""
    reasons = frame.reindex(columns=POINT_COLS + ["reason"]).drop_duplicates(POINT_COLS)  # reason is optional
    w = wide(frame).merge(reasons, on=POINT_COLS, how="left")
    failures = []
    for c in checks:
        keys = KEYS if c.baseline != STRONGEST else [k for k in KEYS if k != "attention"]
        if c.baseline == STRONGEST and c.higher_is_better:
            raise ValueError(f"{c.name}: {STRONGEST} compares lower-is-better metrics (memory, time) only")
        found = w.loc[w.method == c.method, ["attention", *KEYS]].drop_duplicates()
        found = {tuple(r) for r in found.itertuples(index=False)}
        found |= {
            (p.attention, p.model, p.attention, p.gradient_checkpointing, p.context, p.batch_size)
            for p in expected or []
            if p.method == c.method
        }
        points = sorted({tuple(r[1 + KEYS.index(k)] for k in keys) for r in found if c.covers(*r[1:5])})
        if not points:
            failures.append(
                f"{c.name}: covers no point ({c.method} vs {c.baseline} on {c.metric}; check its method and filters)"
            )
            print("FAIL " + failures[-1])
            continue
        for key in points:
            at = w[(w[keys] == pd.Series(key, index=keys)).all(axis=1)]
            if c.baseline == STRONGEST:
                m_status, m_value, m_text = _best(at[at.method == c.method], c.metric)
                b_status, b_value, b_text = _best(at[at.method_name.isin(LORA_FAMILY)], c.metric)
            else:
                m_status, m_value, m_text = _outcome(at[at.method == c.method], c.metric)
                b_status, b_value, b_text = _outcome(at[at.method == c.baseline], c.metric)
            at_key = dict(zip(keys, key))
            head = (
                f"{c.name}: {at_key['model']} {at_key.get('attention', 'best backend')} "
                f"gc={at_key['gradient_checkpointing']} ctx={at_key['context']} b={at_key['batch_size']}: "
            )
            if m_status == "ok" and b_status == "ok":
                ratio = m_value / b_value if c.higher_is_better else b_value / m_value
                ok = (c.min is None or ratio >= c.min) and (c.max is None or ratio <= c.max)
                line = (
                    head + f"{c.metric} {c.baseline} {b_value:.4g} / {c.method} {m_value:.4g} = ratio "
                    f"{ratio:.3f}, bounds [{c.min}, {c.max}]"
                )
                verdict = "ok   " if ok else "FAIL "
            elif m_status == "ok" and b_status == "oom":
                ok, verdict = True, "WIN  "
                line = head + f"{c.baseline} {b_text}, {c.method} fits ({c.metric} {m_value:.4g})"
            else:
                ok, verdict = False, "FAIL "
                line = head + f"{c.method} {m_text}; {c.baseline} {b_text}"
            print(verdict + line)
            if not ok:
                failures.append(line)
    return failures
