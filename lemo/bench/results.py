"""Records -> one long-format CSV (a row per measurement), and the ratios methods are judged by.

Columns: the point (model, method, attention, gradient_checkpointing, context, batch_size), status
and reason, metric, value, unit, and provenance (gpu, driver, versions, commit, timestamp), plus the
method's options as given (JSON) and as resolved when it ran (method_description: defaults filled in).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

UNITS = {
    "step_s": "s",
    "step_s_min": "s",
    "step_s_max": "s",
    "tokens_per_s": "tokens/s",
    "loss": "nats",
    "peak_allocated_gib": "GiB",
    "peak_reserved_gib": "GiB",
    "nvml_peak_used_gib": "GiB",
    "nvml_baseline_used_gib": "GiB",
    "saved_activation_gib": "GiB",
    "trainable_params": "count",
    "steps_timed": "count",
}
POINT_COLS = ["model", "method", "method_name", "attention", "gradient_checkpointing", "context", "batch_size"]
PROV_COLS = [
    "gpu",
    "driver",
    "cuda",
    "torch",
    "transformers",
    "peft",
    "triton",
    "flash_attn",
    "git_commit",
    "git_dirty",
    "timestamp",
]


def record_files(directories) -> list[Path]:
    """The records under `directories`, without the temporary files of a write cut short (.tmp-*)."""
    return [f for d in directories for f in sorted(Path(d).rglob("*.json")) if not f.name.startswith(".tmp-")]


def records_to_frame(paths) -> pd.DataFrame:
    rows = []
    for path in paths:
        try:
            rec = json.loads(Path(path).read_text())
            point, prov = rec["point"], rec["provenance"]
            base = {c: point[c] for c in POINT_COLS}
            base.update(
                status=rec["status"],
                reason=rec.get("reason"),
                attention_label=rec.get("attention_label"),
                rope_factor=rec.get("rope_factor"),
                warmup=point["warmup"],
                steps=point["steps"],
                dtype=point["dtype"],
                config=json.dumps(point["options"], sort_keys=True),
                method_description=rec.get("method_description"),
            )  # the options resolved when it ran
            base.update({c: prov.get(c) for c in PROV_COLS})
            metrics = {k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float)) and v is not None}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a sweep record ({type(err).__name__}: {err})") from err
        if not metrics:  # OOM / skipped / error: one row that says so
            rows.append({**base, "metric": "status", "value": None, "unit": None})
        for name, value in sorted(metrics.items()):
            rows.append(
                {
                    **base,
                    "metric": name,
                    "value": float(value),
                    "unit": UNITS.get(name, "s" if name.startswith("time_") else ""),
                }
            )
    return pd.DataFrame(rows)


def aggregate(record_files, out_csv: Path) -> pd.DataFrame:
    frame = records_to_frame(sorted(record_files))
    frame = frame.sort_values(POINT_COLS + ["metric"]).reset_index(drop=True)
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False)
    return frame


def wide(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per point, metrics as columns (status and the measuring commit kept)."""
    keys = POINT_COLS + ["status"]
    if "git_commit" in frame:  # "" where unknown: a NaN key would drop the row
        frame = frame.assign(git_commit=frame.git_commit.fillna("").astype(str))
        keys = keys + ["git_commit"]
    ok = frame[frame.metric != "status"]
    table = ok.pivot_table(index=keys, columns="metric", values="value", aggfunc="first").reset_index()
    bad = frame[frame.metric == "status"][keys].drop_duplicates()
    return pd.concat([table, bad], ignore_index=True)


def memory_metric(w: pd.DataFrame) -> tuple[str, str]:
    """The memory column a sweep has: allocator peak on GPUs, saved activation bytes on CPU."""
    if "peak_allocated_gib" in w and w["peak_allocated_gib"].notna().any():
        return "peak_allocated_gib", "peak allocated (GiB)"
    return "saved_activation_gib", "saved activations (GiB)"


def ratios(
    frame: pd.DataFrame, metric: str, baseline: str = "lora", higher_is_better: bool = False, same_run: bool = False
) -> pd.DataFrame:
    """baseline / method (or method / baseline when higher is better) per matching point; >1 = method wins.

    Columns: the point, method, base (the baseline's value), value (the method's), ratio. `same_run`
    pairs only points measured by the same commit (one sweep run)."""
    keys = ["model", "attention", "gradient_checkpointing", "context", "batch_size"] + (
        ["git_commit"] if same_run else []
    )
    w = wide(frame)
    w = w[w.status == "ok"]
    if metric not in w:
        return pd.DataFrame(columns=keys + ["method", "base", "value", "ratio"])
    base = w[w.method == baseline][keys + [metric]].rename(columns={metric: "base"})
    other = w[w.method != baseline][keys + ["method", metric]].rename(columns={metric: "value"})
    merged = other.merge(base, on=keys)
    merged["ratio"] = merged.value / merged.base if higher_is_better else merged.base / merged.value
    return merged[keys + ["method", "base", "value", "ratio"]].sort_values(keys + ["method"]).reset_index(drop=True)


# Method names (lemo.bench.methods) of the LoRA baselines, whatever their options (offload, backend, adapter dtype).
LORA_FAMILY = ("lora", "lora-liger")


def strongest_ratios(frame: pd.DataFrame, metric: str, family=LORA_FAMILY, same_run: bool = True) -> pd.DataFrame:
    """Each non-baseline row against the strongest baseline of its point: the family row with the lowest
    `metric` (memory or time: lower is better) on any backend, same commit when `same_run`.

    Columns: the point, method, attention, value, base (the strongest's value), base_method,
    base_attention, baselines (every family row of the point, "method/backend"), ratio = base / value,
    and lora / lora_ratio: plain LoRA on the row's backend in the same run (NaN where not measured)."""
    keys = ["model", "gradient_checkpointing", "context", "batch_size"] + (["git_commit"] if same_run else [])
    cols = keys + [
        "method",
        "attention",
        "value",
        "base",
        "base_method",
        "base_attention",
        "baselines",
        "ratio",
        "lora",
        "lora_ratio",
    ]
    w = wide(frame)
    w = w[w.status == "ok"]
    if metric not in w:
        return pd.DataFrame(columns=cols)
    fam = w[w.method_name.isin(family) & w[metric].notna()]
    ranked = fam.sort_values([metric, "method", "attention"])
    best = ranked.groupby(keys, as_index=False).first()[keys + ["method", "attention", metric]]
    best = best.rename(columns={"method": "base_method", "attention": "base_attention", metric: "base"})
    names = ranked.assign(name=ranked.method + "/" + ranked.attention).groupby(keys).name
    best = best.merge(names.agg(lambda n: ", ".join(sorted(n))).rename("baselines").reset_index(), on=keys)
    other = w[~w.method_name.isin(family) & w[metric].notna()][keys + ["method", "attention", metric]]
    merged = other.rename(columns={metric: "value"}).merge(best, on=keys)
    merged["ratio"] = merged.base / merged.value
    plain = w[w.method == "lora"][keys + ["attention", metric]].rename(columns={metric: "lora"})
    merged = merged.merge(plain, on=keys + ["attention"], how="left")
    merged["lora_ratio"] = merged.lora / merged.value
    return merged[cols].sort_values(keys + ["method", "attention"]).reset_index(drop=True)


def write_rows(path, rows: list[dict]) -> None:
    """Rows as CSV (microbenchmarks, training loss logs); the header is the union of their keys in
    first-seen order (a failed row carries fewer columns than a measured one). Object dtype keeps each
    value as given (an int column with a gap stays ints; floats are written as repr), and the CRLF line
    ends are those of the csv module these files were first written with. A missing value, None or NaN,
    is an empty field."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    pd.DataFrame(rows, columns=fields, dtype=object).to_csv(path, index=False, lineterminator="\r\n")


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of cells already formatted as text (pandas -> tabulate). disable_numparse keeps
    each cell as written: tabulate would otherwise re-format numbers ("0.50" -> "0.5") and align them."""
    return pd.DataFrame(rows, columns=head).to_markdown(index=False, disable_numparse=True)
