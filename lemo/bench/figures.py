"""Figures from the aggregated CSV only: peak memory and tokens/s vs context, per model.

One figure per model: columns = checkpointing off / on; rows = peak allocated memory, tokens/s.
One line per method (colour) and attention backend (line style); out-of-memory points are marked
with an x on the top edge; the paper artifact's A800 numbers are drawn as reference markers where
model and context match (`results/reference/jenga_ae_a800.csv`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .results import memory_metric, wide  # noqa: E402

REFERENCE_MODELS = {"llama2": "llama2-7b", "llama3": "llama3-8b", "opt-350m": "opt-350m", "opt-1.3b": "opt-1.3b",
                    "opt-2.7b": "opt-2.7b", "opt-6.7b": "opt-6.7b"}
# The artifact's LeMo ("jenga") prunes MLP channels in backward: drawn in lemo-channel's colour.
REFERENCE_METHODS = {"lora": "lora", "longlora": "longlora", "jenga": "lemo-channel"}
STYLES = ["-", "--", ":", "-."]
# One colour per method in every figure: baselines fixed, other labels a stable pick from the palette.
METHOD_COLORS = {"lora": "#1f77b4", "lora-liger": "#17becf", "longlora": "#2ca02c", "pretrained": "#7f7f7f",
                 "pretrained+PI": "#bcbd22", "lemo-paper": "#d62728", "lemo-channel": "#d62728",
                 "lemo-frozen": "#ff7f0e", "lemo-token": "#9467bd", "lemo-shared-kept": "#8c564b",
                 "lemo-frozen-deep40": "#e377c2", "lemo-frozen-deep": "#7f3b08", "lemo-frozen-channel": "#393b79"}
_PALETTE = ["#637939", "#8c6d31", "#843c39", "#7b4173", "#e6550d", "#31a354", "#756bb1", "#636363"]


def method_color(label: str) -> str:
    if label in METHOD_COLORS:
        return METHOD_COLORS[label]
    import zlib

    return _PALETTE[zlib.crc32(label.encode()) % len(_PALETTE)]  # stable across runs, unlike hash()


def load_reference(path: Path | None) -> pd.DataFrame:
    if path is None or not Path(path).exists():
        return pd.DataFrame()
    ref = pd.read_csv(path)
    ref = ref[ref.gpu == "a800"].copy()
    ref["model"] = ref.model.map(REFERENCE_MODELS)
    ref["method"] = ref.method.map(REFERENCE_METHODS)
    return ref


def plot_model(frame: pd.DataFrame, model: str, out: Path, reference: pd.DataFrame, title_extra: str = "") -> Path:
    w = wide(frame[frame.model == model])
    mem_col, mem_label = memory_metric(w)
    methods = sorted(w.method.unique())
    backends = sorted(w.attention.unique())
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    for col, gc in enumerate([False, True]):
        sub = w[w.gradient_checkpointing == gc]
        for row, (metric, label) in enumerate([(mem_col, mem_label), ("tokens_per_s", "tokens / s")]):
            ax = axes[row][col]
            for m in methods:
                for b_i, b in enumerate(backends):
                    pts = sub[(sub.method == m) & (sub.attention == b)].sort_values("context")
                    ok = pts[pts.status == "ok"]
                    if metric in ok and ok[metric].notna().any():
                        ax.plot(ok.context, ok[metric], STYLES[b_i % len(STYLES)], marker="o", ms=4,
                                color=colors[m], label=f"{m} / {b}")
                    oom = pts[pts.status == "oom"]
                    if len(oom):
                        ax.plot(oom.context, [1.0] * len(oom), "x", ms=9, mew=2, color=colors[m],
                                transform=ax.get_xaxis_transform(), clip_on=False,
                                label=f"{m} / {b}: OOM")
            _reference_markers(ax, reference, model, gc, metric, colors)
            if not ax.lines:
                ax.text(0.5, 0.5, "not measured here", ha="center", va="center", transform=ax.transAxes, color="0.5")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"{'with' if gc else 'without'} gradient checkpointing")
            ax.grid(alpha=0.3)
    handles, labels = {}, []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in handles:
                handles[l] = h
                labels.append(l)
    fig.legend([handles[l] for l in labels], labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    gpu = frame.gpu.dropna().unique()
    fig.suptitle(f"{model} on {', '.join(map(str, gpu)) or '?'}{title_extra}")
    fig.tight_layout(rect=(0, 0.03 + 0.025 * ((len(labels) + 2) // 3), 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _reference_markers(ax, reference, model, gc, metric, colors):
    if reference.empty:
        return
    ref = reference[(reference.model == model) & (reference.recompute == gc)]
    for method, grp in ref.groupby("method"):
        if metric == "peak_allocated_gib":
            pts = grp[grp.metric == "peak_allocated_mib"]
            y = pts.value / 1024
        elif metric == "tokens_per_s":
            pts = grp[grp.metric == "step_time_ms"]
            y = pts.context / (pts.value / 1000)
        else:
            continue
        if len(pts):
            name = {"lemo-channel": "LeMo (jenga)"}.get(method, method)
            ax.plot(pts.context, y, "D", mfc="none", ms=8, color=colors.get(method, "0.5"),
                    label=f"paper A800 artifact: {name}")


def plot_all(csv: Path, out_dir: Path, reference: Path | None = None) -> list[Path]:
    frame = pd.read_csv(csv)
    ref = load_reference(reference)
    return [plot_model(frame, model, Path(out_dir) / f"{model}.png", ref) for model in sorted(frame.model.unique())]
