"""Markdown tables from an aggregated CSV: what README and issue notes quote, never typed by hand.

`summary(frame)` renders: memory without recomputation, step time with recomputation, the kernel-time
breakdown where profiled, and every other point as a flat table. `update_readme` replaces the block
between `<!-- results:NAME -->` and `<!-- /results:NAME -->` with that summary.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .goals import RatioTarget, goals
from .results import markdown_table, memory_metric, strongest_ratios, wide


def _fmt(x, digits=2):
    return "" if pd.isna(x) else f"{x:.{digits}f}"


def _status(row, col, digits=2):
    return _fmt(getattr(row, col, float("nan")), digits) if row.status == "ok" else row.status.upper()


def _pivot_table(
    w: pd.DataFrame, metric: str, methods: list[str], baseline: str, higher_is_better: bool, digits: int
) -> str:
    rows = []
    cols = [m for m in methods if m in set(w.method)]
    head = (
        ["model", "attention", "context"]
        + cols
        + [f"{baseline}/{m}" if not higher_is_better else f"{m}/{baseline}" for m in cols if m != baseline]
    )
    for (model, attention, context), grp in w.groupby(["model", "attention", "context"]):
        by = {r.method: r for r in grp.itertuples()}
        if baseline not in by:
            continue
        cells = [model, attention, str(context)]
        cells += [_status(by[m], metric, digits) if m in by else "" for m in cols]
        base = by[baseline]
        for m in cols:
            if m == baseline:
                continue
            r = by.get(m)
            if r is None or r.status != "ok" or base.status != "ok":
                cells.append("")
                continue
            ratio = (
                getattr(r, metric) / getattr(base, metric)
                if higher_is_better
                else getattr(base, metric) / getattr(r, metric)
            )
            cells.append(f"{ratio:.2f}x")
        rows.append(cells)
    return markdown_table(head, rows) if rows else ""


def target_points(frame: pd.DataFrame, target: RatioTarget, same_run: bool = False) -> pd.DataFrame:
    """`strongest_ratios` of the LeMo variants at one ratio target's point (method, then backend order):
    each against the strongest LoRA-family row of the point on any backend, plain LoRA beside it."""
    r = strongest_ratios(frame, target.metric, same_run=same_run)
    r = r[
        (r.model == target.model)
        & (r.gradient_checkpointing == target.gradient_checkpointing)
        & (r.context == target.context)
        & r.method.str.startswith("lemo")
    ]
    return r.sort_values(["method", "attention"])


def targets(frame: pd.DataFrame) -> str:
    """Each LeMo variant against each target we measure: the ratio to the strongest LoRA-family row
    (lowest value on any backend; lora, lora-liger, offloaded or not), and to plain LoRA on its backend."""
    head = ["target", "model", "LeMo variant", "backend", "LeMo", "strongest LoRA-family", "its value", "ratio"]
    head += ["plain LoRA, same backend", "ratio vs plain LoRA", "target", "paper (A800, plain LoRA)"]
    rows = []
    for t in goals().ratio_targets:
        label, model, goal, paper = t.label, t.model, t.goal, t.paper
        for r in target_points(frame, t).itertuples():
            plain = ["", ""] if pd.isna(r.lora) else [f"{r.lora:.2f}", f"{r.lora_ratio:.2f}x"]
            rows.append(
                [label, model, r.method, r.attention, f"{r.value:.2f}", f"{r.base_method} ({r.base_attention})"]
                + [f"{r.base:.2f}", f"{r.ratio:.2f}x", *plain, f"{goal:.2f}x", f"{paper:.2f}x"]
            )
    return markdown_table(head, rows) if rows else ""


MEMORY_VIEWS = ("peak_allocated_gib", "peak_reserved_gib", "nvml_peak_used_gib")


def largest_memory_view(w: pd.DataFrame) -> pd.Series:
    """Per point, the largest of the memory views measured (NaN where none was)."""
    return w[[c for c in MEMORY_VIEWS if c in w]].max(axis=1)


def budgets(frame: pd.DataFrame) -> str:
    """Every method at a budget target's point, with the allocator's and the device's peak.

    Within the budget means it ran and its largest view of memory fits: the NVML device peak (which
    includes the CUDA context) where it was sampled, else the allocator's ("yes (allocator)"). An OOM
    row shows the peak reached before failing, not what the step needed; points that were skipped or
    failed say nothing about the budget ("-")."""
    w = wide(frame)
    head = ["target", "model", "backend", "method", "status", "step (s)", "peak allocated (GiB)"]
    head += ["peak reserved (GiB)", "device peak, NVML (GiB)", "within"]
    rows = []
    for b in goals().budgets:
        label, model, budget = b.label, b.model, b.budget_gib
        pts = w[(w.model == model) & (w.gradient_checkpointing == b.gradient_checkpointing) & (w.context == b.context)]
        pts = pts.assign(largest=largest_memory_view(pts))
        for r in pts.sort_values(["attention", "method"]).itertuples():
            views = [getattr(r, c, float("nan")) for c in MEMORY_VIEWS]
            if r.status == "oom":
                within = "no"
            elif r.status != "ok" or pd.isna(r.largest):
                within = "-"
            else:
                within = "yes" if r.largest <= budget else "no"
                if within == "yes" and pd.isna(views[-1]):
                    within = "yes (allocator)"
            cells = [label, model, r.attention, r.method, r.status.upper(), _fmt(getattr(r, "step_s", float("nan")), 1)]
            rows.append(cells + [_fmt(v, 1) for v in views] + [within])
    return markdown_table(head, rows) if rows else ""


def anchors(frame: pd.DataFrame, paper_csv: Path, probe_csv: Path) -> str:
    """Our LoRA peak memory next to the paper artifact's (A800) and our earlier H200 probe's."""
    w = wide(frame)
    w = w[(w.status == "ok") & w.method.isin(["lora", "lora-fp32"]) & (w.attention == "sdpa-flash")]
    paper = pd.read_csv(paper_csv)
    paper = paper[(paper.gpu == "a800") & (paper.method == "lora") & (paper.metric == "peak_allocated_mib")]
    probe = pd.read_csv(probe_csv)
    names = {"llama2-7b": "llama2", "llama3-8b": "llama3"}
    head = ["model", "recompute", "context", "ours: LoRA fp32 adapters (PEFT default)", "ours: LoRA bf16 adapters"]
    head += ["earlier H200 probe", "paper A800"]
    rows = []
    for (model, gc, context), grp in w.groupby(["model", "gradient_checkpointing", "context"]):
        by = {r.method: r.peak_allocated_gib for r in grp.itertuples()}
        p = paper[(paper.model == names.get(model)) & (paper.context == context) & (paper.recompute == gc)]
        q = probe[
            (probe.context == context)
            & (probe.gradient_checkpointing == gc)
            & (model == "llama2-7b")
            & probe.attention.str.startswith("sdpa default")
        ]
        cell = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
        rows.append(
            [model, str(gc), str(context), cell(by.get("lora-fp32")), cell(by.get("lora"))]
            + [cell(q.peak_allocated_gib.iloc[0] if len(q) else None), cell(p.value.iloc[0] / 1024 if len(p) else None)]
        )
    return markdown_table(head, rows)


def summary(
    frame: pd.DataFrame, baseline: str = "lora", paper_csv: Path | None = None, probe_csv: Path | None = None
) -> str:
    w = wide(frame)
    methods = [baseline] + sorted(m for m in w.method.unique() if m != baseline)
    gpu = ", ".join(sorted(map(str, frame.gpu.dropna().unique())))
    commits = ", ".join(sorted(c[:10] for c in frame.git_commit.dropna().astype(str).unique()))
    warmup = ", ".join(map(str, sorted(frame.warmup.unique())))
    steps = ", ".join(map(str, sorted(frame.steps.unique())))
    batch = ", ".join(map(str, sorted(frame.batch_size.unique()))) if "batch_size" in frame else "1"
    out = [
        f"Measured on {gpu} (commit {commits}); batch {batch}; {warmup} warm-up step(s), then the median of "
        f"{steps} timed step(s).",
        "",
    ]
    target_table = targets(frame)
    if target_table:
        out += [
            "**Targets against the strongest LoRA-family row of the point, any backend (see the commits above "
            "for which points share a run)**",
            "",
            target_table,
            "",
        ]
    budget_table = budgets(frame)
    if budget_table:
        out += ["**Memory budget targets (OOM = out of memory on this GPU)**", "", budget_table, ""]
    if paper_csv is not None and probe_csv is not None and "lora-fp32" in set(w.method):
        out += [
            "**LoRA peak allocated memory (GiB) against earlier figures**",
            "",
            anchors(frame, paper_csv, probe_csv),
            "",
        ]
    mem, mem_label = memory_metric(w)
    no_gc = w[w.gradient_checkpointing == False]  # noqa: E712
    if len(no_gc):
        out += [
            f"**{mem_label[0].upper() + mem_label[1:]}, no recomputation; ratio > 1 = less memory than LoRA**",
            "",
            _pivot_table(no_gc, mem, methods, baseline, False, 3 if mem == "saved_activation_gib" else 1),
            "",
        ]
        out += [
            "**Step time (s), no recomputation; ratio > 1 = faster than LoRA**",
            "",
            _pivot_table(no_gc, "step_s", methods, baseline, False, 3),
            "",
        ]
    gc = w[w.gradient_checkpointing == True]  # noqa: E712
    if len(gc):
        out += [
            "**Step time (s), with recomputation; ratio > 1 = faster than LoRA**",
            "",
            _pivot_table(gc, "step_s", methods, baseline, False, 2),
            "",
        ]
        if mem == "peak_allocated_gib":  # saved bytes are not measured under recomputation
            out += [
                "**Peak allocated memory (GiB), with recomputation**",
                "",
                _pivot_table(gc, mem, methods, baseline, False, 1),
                "",
            ]
    time_cols = sorted(c for c in w.columns if str(c).startswith("time_") and c.endswith("_s"))
    prof = w[w[time_cols].notna().any(axis=1)] if time_cols else w.iloc[0:0]
    if len(prof):
        head = ["model", "attention", "recompute", "context", "method", "step_s"] + [c[5:-2] for c in time_cols]
        rows = [
            [r.model, r.attention, str(r.gradient_checkpointing), str(r.context), r.method, _fmt(r.step_s, 3)]
            + [_fmt(getattr(r, c), 3) for c in time_cols]
            for r in prof.sort_values(["model", "gradient_checkpointing", "context", "method"]).itertuples()
        ]
        out += ["**Where device time goes (s, one profiled step, by kernel category)**", ""]
        out += [markdown_table(head, rows), ""]
    return "\n".join(out)


def update_readme(readme: Path, name: str, text: str) -> None:
    begin, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    body = readme.read_text()
    if begin not in body or end not in body:
        raise ValueError(f"{readme} has no {begin} ... {end} block to fill")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", body))
