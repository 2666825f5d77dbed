"""Figures from the aggregated CSV only: peak memory and tokens/s vs context, per model.

One figure per model: columns = recomputation off / on; rows = peak allocated memory, tokens/s; a panel
with nothing to draw is left out. One line per method (colour, METHOD_COLORS) and attention backend
(line style and marker, BACKEND_STYLES), the same in every figure of the project; out-of-memory points
are marked with an x on the top edge; the paper artifact's A800 numbers are hollow diamonds in the
method's colour where model and context match (`results/reference/jenga_ae_a800.csv`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .results import memory_metric, wide  # noqa: E402

REFERENCE_MODELS = {
    "llama2": "llama2-7b",
    "llama3": "llama3-8b",
    "opt-350m": "opt-350m",
    "opt-1.3b": "opt-1.3b",
    "opt-2.7b": "opt-2.7b",
    "opt-6.7b": "opt-6.7b",
}
# The artifact's LeMo ("jenga") prunes MLP channels in backward: drawn in lemo-channel's colour.
REFERENCE_METHODS = {"lora": "lora", "longlora": "longlora", "jenga": "lemo-channel"}
# One colour per method in every figure: baselines fixed, other labels a stable pick from the palette.
METHOD_COLORS = {
    # baselines
    "lora": "#1f77b4",
    "lora-liger": "#17becf",
    "lora-fp32": "#aec7e8",
    "longlora": "#2ca02c",
    "pretrained": "#7f7f7f",
    "pretrained+PI": "#bcbd22",
    # the default LeMo variant, and the paper's schedule (lemo-paper = lemo-channel with kernels)
    "lemo-shared-kept-deep40": "#000000",
    "lemo-paper": "#d62728",
    "lemo-channel": "#d62728",
    "lemo-paper-attn": "#ff9896",
    "lemo-paper-token": "#9467bd",
    "lemo-token": "#9467bd",
    "lemo-channel-kernels": "#e6550d",
    "lemo-channel-kernels-dense": "#fdae6b",
    "lemo-channel-kernels-liger": "#a55194",
    "lemo-channel-kernels-ligerdense": "#ce6dbd",
    "lemo-channel-kernels-norecompute": "#843c39",
    "lemo-channel-deep-liger": "#637939",
    "lemo-channel-all": "#8c6d31",
    "lemo-channel-all-liger": "#bd9e39",
    "lemo-channel-all-offload": "#e7ba52",
    "lemo-channel-hfnorm": "#ad494a",
    "lemo-channel-noseg": "#7b4173",
    "lemo-channel-predictor": "#b5cf6b",
    "lemo-shared-kept": "#8c564b",
    "lemo-shared-kept-deep50": "#c49c94",
    "lemo-shared-kept-deep40-liger": "#525252",
    "lemo-frozen": "#ff7f0e",
    "lemo-frozen-deep40": "#e377c2",
    "lemo-frozen-deep": "#7f3b08",
    "lemo-frozen-channel": "#393b79",
    "lemo-frozen-channel-sparse": "#5254a3",
    "lemo-frozen-channel50": "#6b6ecf",
    "lemo-frozen-keep60": "#f7b6d2",
    "lemo-frozen-late": "#c7c7c7",
    "lemo-frozen-local": "#98df8a",
    "lemo-frozen-shared": "#dbdb8d",
    "lemo-frozen-torch": "#9edae5",
    # the small accuracy experiment
    "lemo-predictor": "#fd8d3c",
    "lemo-token-keep100": "#9c9ede",
    "lemo-token-keep60": "#8ca252",
    "lemo-token-keep80": "#de9ed6",
    "lemo-token-last2": "#74c476",
    "lemo-token-sink": "#e7cb94",
}
_PALETTE = ["#637939", "#8c6d31", "#843c39", "#7b4173", "#e6550d", "#31a354", "#756bb1", "#636363"]


def method_color(label: str) -> str:
    if label in METHOD_COLORS:
        return METHOD_COLORS[label]
    import zlib

    return _PALETTE[zlib.crc32(label.encode()) % len(_PALETTE)]  # stable across runs, unlike hash()


# One line style and marker per attention backend in every figure (hatch: bar figures).
BACKEND_STYLES = {
    "sdpa-flash": {"linestyle": "-", "marker": "o", "hatch": ""},
    "sdpa-cudnn": {"linestyle": "--", "marker": "s", "hatch": "//"},
    "sdpa-efficient": {"linestyle": "-.", "marker": "^", "hatch": "\\\\"},
    "sdpa-math": {"linestyle": ":", "marker": "v", "hatch": ".."},
    "eager": {"linestyle": (0, (5, 1, 1, 1, 1, 1)), "marker": "P", "hatch": "xx"},
    "flash-attn": {"linestyle": (0, (1, 3)), "marker": "D", "hatch": "--"},
}
FALLBACK_BACKEND_STYLE = {"linestyle": (0, (8, 2)), "marker": "X", "hatch": "++"}
PAPER_LABEL = "paper (A800 artifact)"


def backend_style(backend: str) -> dict:
    """linestyle, marker and hatch of an attention backend (the same in every figure)."""
    return dict(BACKEND_STYLES.get(backend, FALLBACK_BACKEND_STYLE))


def line_style(backend: str) -> dict:
    """Keyword arguments for ax.plot: the backend's line style and marker."""
    s = backend_style(backend)
    return {"linestyle": s["linestyle"], "marker": s["marker"]}


def metric_title(label: str, recompute: bool) -> str:
    return f"{label}, {'with' if recompute else 'without'} recomputation"


def load_reference(path: Path | None) -> pd.DataFrame:
    if path is None or not Path(path).exists():
        return pd.DataFrame()
    ref = pd.read_csv(path)
    ref = ref[ref.gpu == "a800"].copy()
    ref["model"] = ref.model.map(REFERENCE_MODELS)
    ref["method"] = ref.method.map(REFERENCE_METHODS)
    return ref


def _panel_has_data(sub: pd.DataFrame, metric: str) -> bool:
    """Measured points or OOMs (the paper's markers alone do not make a panel)."""
    ok = sub[sub.status == "ok"]
    return bool((metric in ok and ok[metric].notna().any()) or (sub.status == "oom").any())


def plot_model(frame: pd.DataFrame, model: str, out: Path, reference: pd.DataFrame, title_extra: str = "") -> Path:
    w = wide(frame[frame.model == model])
    mem_col, mem_label = memory_metric(w)
    mem_label = {"peak allocated (GiB)": "peak allocated memory (GiB)"}.get(mem_label, mem_label)
    methods = sorted(w.method.unique())
    backends = sorted(w.attention.unique())
    panels = []  # (recompute, metric, label): only those with something to draw
    for metric, label in [(mem_col, mem_label), ("tokens_per_s", "throughput (tokens/s)")]:
        for gc in (False, True):
            sub = w[w.gradient_checkpointing == gc]
            if _panel_has_data(sub, metric):
                panels.append((gc, metric, label))
    ncols = min(2, len(panels)) or 1
    nrows = max(1, -(-len(panels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(9.0, 5.5 * ncols + 0.8), 3.4 * nrows), squeeze=False)
    for ax, (gc, metric, label) in zip(axes.flat, panels):
        sub = w[w.gradient_checkpointing == gc]
        for m in methods:
            for b in backends:
                pts = sub[(sub.method == m) & (sub.attention == b)].sort_values("context")
                ok = pts[pts.status == "ok"]
                if metric in ok and ok[metric].notna().any():
                    ax.plot(ok.context, ok[metric], ms=5, color=method_color(m), label=f"{m} / {b}", **line_style(b))
                oom = pts[pts.status == "oom"]
                if len(oom):
                    ax.plot(
                        oom.context,
                        [1.0] * len(oom),
                        "x",
                        ms=9,
                        mew=2,
                        color=method_color(m),
                        transform=ax.get_xaxis_transform(),
                        clip_on=False,
                        label=f"{m} / {b}: OOM",
                    )
        _reference_markers(ax, reference, model, gc, metric, set(sub.context))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.set_title(metric_title(label, gc), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.remove()
    labels = _figure_legend(fig, [ax for ax in fig.axes])
    gpu = frame.gpu.dropna().unique()
    fig.suptitle(
        f"{model} on {', '.join(map(str, gpu)) or '?'}{title_extra}\n"
        "colour: method; line style and marker: attention backend; x on the top edge: out of memory",
        fontsize=10,
    )
    legend_in = 0.2 * (-(-labels // 3)) + 0.25  # the legend's height (inches) below the panels
    height = 3.4 * nrows + 0.8 + legend_in
    fig.set_size_inches(max(9.0, 5.5 * ncols + 0.8), height)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1 - 0.7 / height))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _figure_legend(fig, axes, ncol: int = 3) -> int:
    """One legend for the figure below the panels, each label once; returns the number of labels."""
    handles, labels = {}, []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in handles:
                handles[l] = h
                labels.append(l)
    fig.legend([handles[l] for l in labels], labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    return len(labels)


def _reference_points(reference: pd.DataFrame, model: str, gc: bool, metric: str) -> pd.DataFrame:
    """The artifact's points for one panel: columns method, context, y."""
    if reference.empty:
        return pd.DataFrame(columns=["method", "context", "y"])
    ref = reference[(reference.model == model) & (reference.recompute == gc)]
    if metric == "peak_allocated_gib":
        pts = ref[ref.metric == "peak_allocated_mib"].assign(y=lambda d: d.value / 1024)
    elif metric == "tokens_per_s":
        pts = ref[ref.metric == "step_time_ms"].assign(y=lambda d: d.context / (d.value / 1000))
    else:
        return pd.DataFrame(columns=["method", "context", "y"])
    return pts[["method", "context", "y"]]


def _reference_markers(ax, reference, model, gc, metric, contexts=None):
    """The paper artifact's numbers (at the contexts measured here): hollow diamonds in the method's colour,
    one legend entry per method."""
    ref = _reference_points(reference, model, gc, metric)
    if contexts is not None:
        ref = ref[ref.context.isin(contexts)]
    for method, pts in ref.groupby("method"):
        name = {"lemo-channel": "LeMo (jenga)"}.get(method, method)
        ax.plot(
            pts.context,
            pts.y,
            "D",
            mfc="none",
            mew=1.5,
            ms=8,
            linestyle="none",
            color=method_color(method),
            label=f"{name}: {PAPER_LABEL}",
        )


def plot_all(csv: Path, out_dir: Path, reference: Path | None = None) -> list[Path]:
    frame = pd.read_csv(csv)
    ref = load_reference(reference)
    return [plot_model(frame, model, Path(out_dir) / f"{model}.png", ref) for model in sorted(frame.model.unique())]
