"""Max-context search results (lemo.bench.maxctx result.json files) -> max_context.csv, a table and a bar figure.

The table compares each method with the best LoRA-family row (lora, lora-*, any backend) of the same
model and cap: the "vs best LoRA" column is max_context / that row's max_context. A search that did not
find its memory limit (e.g. ended on "time") carries `memory_fit_context`: where the straight line through
its two longest fits' peak allocated memory reaches the capacity, an extrapolation compared in its own
"(fit)" columns, never a measurement. One that found it carries `fit_overshoot_pct` instead: how far the
same fit lies beyond the measured limit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd

from .maxctx import DEFAULT_SEARCH, Probe, _memory_prediction, _round_down
from .results import PROV_COLS, markdown_table

COLUMNS = [
    "model",
    "method",
    "method_name",
    "attention",
    "gradient_checkpointing",
    "cap_gib",
    "max_context",
    "step_s",
    "peak_gib",
    "bound",
    "memory_fit_context",
    "fit_overshoot_pct",
    "probes",
    "device_total_gib",
    "config",
]


def is_lora_family(method: str) -> bool:
    """By label (lora, lora-liger-offload, ...); results.LORA_FAMILY names the Methods themselves."""
    return method == "lora" or method.startswith("lora-")


MEASURED_LIMIT = ("memory", "host-ram")  # bounds at which a search found its memory limit: no fit needed


def memory_fit_context(result: dict) -> float:
    """The context at which the line through the two longest fitting probes' peak allocated memory reaches the
    capacity (the cap, else the device's memory), rounded down to the search's granularity; NaN without such a
    line (fewer than two fits, or peaks not increasing). The search's own prediction, at margin 1."""
    fields = {f.name for f in dataclasses.fields(Probe)}
    probes = [Probe(**{k: v for k, v in p.items() if k in fields}) for p in result["probes"]]
    fits = sorted((p for p in probes if p.status == "ok"), key=lambda p: p.context)
    cap = result.get("cap_gib")
    predicted = _memory_prediction(fits, cap if cap is not None else result.get("device_total_gib"), margin=1.0)
    if predicted is None:
        return math.nan
    granularity = (result.get("settings") or {}).get("granularity", DEFAULT_SEARCH["granularity"])
    return _round_down(predicted, granularity)


def _fit_columns(result: dict) -> dict:
    """memory_fit_context where the search did not find its memory limit (there the measurement stands), and
    where it did, how far its fit lies beyond the measured limit (how optimistic the fits elsewhere are)."""
    fit = memory_fit_context(result)
    if result.get("bound") not in MEASURED_LIMIT:
        return {"memory_fit_context": fit, "fit_overshoot_pct": math.nan}
    measured = result.get("max_context") or 0
    overshoot = 100 * (fit / measured - 1) if measured and not math.isnan(fit) else math.nan
    return {"memory_fit_context": math.nan, "fit_overshoot_pct": overshoot}


def results_frame(paths) -> pd.DataFrame:
    rows = []
    for path in paths:
        r = json.loads(Path(path).read_text())
        row = {c: r.get(c) for c in COLUMNS if c in r}
        row.update(_fit_columns(r))
        row.update(probes=len(r["probes"]), config=json.dumps(r["options"], sort_keys=True))
        row.update({c: r["provenance"].get(c) for c in PROV_COLS})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=COLUMNS + PROV_COLS)
    return frame.sort_values(["model", "cap_gib", "method", "attention"], na_position="last").reset_index(drop=True)


def write_csv(paths, out_csv: Path) -> pd.DataFrame:
    frame = results_frame(sorted(paths))
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    frame.astype({"memory_fit_context": "Int64"}).to_csv(out_csv, index=False)  # whole tokens; empty where no fit
    return frame


def _cap(v) -> str:
    return "full GPU" if pd.isna(v) else f"{v:g} GiB"


def _tokens(n) -> str:
    return f"{int(n) // 1024}K" if n and int(n) % 1024 == 0 else str(int(n))


def _ratio(value, best) -> str:
    """value / best as "1.23x"; empty where either is missing (NaN) or best is 0."""
    return f"{value / best:.2f}x" if best and not pd.isna(value) and not pd.isna(best) else ""


def _overshoot(pct) -> str:
    return "" if pd.isna(pct) else f"{pct:+.0f}%"


def table(frame: pd.DataFrame) -> str:
    head = ["model", "memory cap", "method", "attention", "recompute", "max context", "step (s)"]
    head += ["peak allocated (GiB)", "bound", "vs best LoRA-family", "memory fit to the cap"]
    head += ["vs best LoRA-family (fit)", "fit beyond the measured limit"]
    lines = []
    for (model, cap), grp in frame.groupby(["model", frame.cap_gib.fillna(-1)], sort=True):
        lora = grp[grp.method.map(is_lora_family)]
        best, best_fit = lora.max_context.max(), lora.memory_fit_context.max()  # NaN without LoRA-family rows
        for r in grp.sort_values("max_context", ascending=False).itertuples():
            step = "" if pd.isna(r.step_s) else f"{r.step_s:.1f}"
            peak = "" if pd.isna(r.peak_gib) else f"{r.peak_gib:.1f}"
            fit = "" if pd.isna(r.memory_fit_context) else f"{_tokens(r.memory_fit_context)} (fit)"
            lines.append(
                [str(model), _cap(r.cap_gib), str(r.method), str(r.attention), str(r.gradient_checkpointing)]
                + [_tokens(r.max_context), step, peak, str(r.bound), _ratio(r.max_context, best)]
                + [fit, _ratio(r.memory_fit_context, best_fit), _overshoot(r.fit_overshoot_pct)]
            )
    return markdown_table(head, lines)


def summary(frame: pd.DataFrame) -> str:
    gpu = ", ".join(sorted(map(str, frame.gpu.dropna().unique())))
    commits = ", ".join(sorted(c[:10] for c in frame.git_commit.dropna().astype(str).unique()))
    return "\n".join(
        [
            f"Max trainable context, one training step per probe, measured on {gpu} (commit {commits}): doubling, a "
            "jump to the context the peak-memory fit predicts, galloping, then bisection at the sweep's granularity; a "
            "cap is torch.cuda.set_per_process_memory_fraction. Bound = what ended the search (lemo.bench.maxctx): "
            '"memory" = the next probe ran out of memory; "time" = a longer step was predicted over the sweep\'s '
            "time bound, so memory would allow more.",
            '"memory fit to the cap" (searches that did not find their memory limit) = where a straight line '
            "through the peak allocated memory of the two longest fitting probes reaches the cap (the device's "
            'memory without one): an extrapolation, not a measurement; "(fit)" ratios compare fits. Where a search '
            'did find its limit, "fit beyond the measured limit" says how far the same fit overshoots it (the cap '
            "bounds reserved memory, which exceeds allocated): a fit is optimistic by about as much.",
            "",
            table(frame),
            "",
        ]
    )


def _fit_extensions(ax, grp: pd.DataFrame, labels: list[str]) -> None:
    """The peak-memory fit as an outlined, hatched bar from the measured maximum to the fit (leftwards where the
    fit falls short of it): drawn apart from the measured bars, as it is no measurement."""
    fitted = grp.memory_fit_context.notna().to_numpy()
    if not fitted.any():
        return
    measured, fit = grp.max_context[fitted] / 1024, grp.memory_fit_context[fitted] / 1024
    ax.barh(
        [label for label, f in zip(labels, fitted) if f],
        fit - measured,
        left=measured,
        fill=False,
        edgecolor="0.35",
        linestyle="--",
        hatch="..",
        label="peak-memory fit (extrapolated)",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False)  # below: no bar hidden


def figure(frame: pd.DataFrame, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import backend_style, method_color

    groups = list(frame.groupby(["model", frame.cap_gib.fillna(-1)], sort=True))
    fig, axes = plt.subplots(
        1, len(groups), figsize=(6 * len(groups), 0.45 * frame.method.nunique() + 2), squeeze=False
    )
    for ax, ((model, _), grp) in zip(axes[0], groups):
        grp = grp.sort_values("max_context")
        labels = [f"{r.method} ({r.attention})" for r in grp.itertuples()]
        bars = ax.barh(labels, grp.max_context / 1024, color=[method_color(m) for m in grp.method], edgecolor="white")
        for bar, backend in zip(bars, grp.attention):  # the backend's hatch, as in every bar figure
            bar.set_hatch(backend_style(backend)["hatch"])
        _fit_extensions(ax, grp, labels)
        for y, r in enumerate(grp.itertuples()):
            text, end = f" {_tokens(r.max_context)} ({r.bound})", r.max_context
            if not pd.isna(r.memory_fit_context):  # the label goes past the fit's bar too
                text, end = f"{text}, fit {_tokens(r.memory_fit_context)}", max(end, r.memory_fit_context)
            ax.text(end / 1024, y, text, va="center", fontsize=8)
        longest = grp[["max_context", "memory_fit_context"]].max().max()  # NaN fits skipped
        ax.set_xlim(0, 1.4 * max(longest, 1) / 1024)  # room for the labels
        ax.set_xlabel("max trainable context (K tokens)")
        ax.set_title(f"max trainable context (K tokens), {model}, {_cap(grp.cap_gib.iloc[0])}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # long method labels widen the figure, not clip the title
    plt.close(fig)
    return out
