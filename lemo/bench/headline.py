"""`lemo headline`: one figure a reviewer reads first, from committed results only.

(a) LeMo's peak-memory and step-time ratios against the strongest LoRA-family baseline (the lowest value
among lora and lora-liger rows of the same run, any backend: results.strongest_ratios) versus context, for
the default variant and the paper's variants found in the sweeps; > 1 means LeMo uses less memory / is
faster. Where LeMo itself ran on several backends, its best row is drawn.
(b) The quality-memory frontier of the SmolLM2 experiment (accuracy/smollm2/frontier.csv).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .figures import method_color  # noqa: E402
from .results import strongest_ratios  # noqa: E402

SWEEPS = ("h200-crossover", "h200-target8k", "h200-target64k", "h200-frontier", "h200")
DEFAULT_LABEL = "lemo-shared-kept-deep40"
# The paper's schedule (all layers sparse, per-layer selection, channel MLP): lemo-paper = lemo-channel + kernels.
PAPER_LABELS = ("lemo-paper", "lemo-channel", "lemo-channel-kernels")
METRICS = (("peak_allocated_gib", "peak allocated memory"), ("step_s", "step time"))
MODEL_MARKERS = {"llama2-7b": "o", "llama3-8b": "s"}  # others: "^"


def headline_ratios(results: Path, sweeps=SWEEPS, labels=(DEFAULT_LABEL, *PAPER_LABELS)) -> pd.DataFrame:
    """One row per sweep, label, model, recomputation, context and metric: the best ratio over LeMo's backends."""
    rows = []
    for sweep in sweeps:
        csv = Path(results) / sweep / "sweep.csv"
        if not csv.exists():
            continue
        frame = pd.read_csv(csv)
        for metric, *_ in METRICS:
            r = strongest_ratios(frame, metric)
            r = r[r.method.isin(labels)]
            if len(r):
                rows.append(r.assign(sweep=sweep, metric=metric))
    if not rows:
        return pd.DataFrame(
            columns=["sweep", "metric", "method", "model", "gradient_checkpointing", "context", "ratio"]
        )
    r = pd.concat(rows, ignore_index=True)
    keys = ["sweep", "metric", "method", "model", "gradient_checkpointing", "context"]
    return r.groupby(keys, as_index=False).ratio.max()


def headline(results: Path, out: Path) -> Path:
    from ..accuracy.quality import draw_frontier, paper_points

    results = Path(results)
    ratios = headline_ratios(results)
    fig, axes = plt.subplots(1, 3, figsize=(18, 7.2), gridspec_kw={"width_ratios": [1, 1, 1.15]})
    for ax, (metric, name) in zip(axes[:2], METRICS):
        r = ratios[ratios.metric == metric]
        for (method, model, gc, sweep), g in r.groupby(["method", "model", "gradient_checkpointing", "sweep"]):
            g = g.sort_values("context")
            ax.plot(
                g.context,
                g.ratio,
                linestyle=(":" if gc else "-") if len(g) > 1 else "none",
                marker=MODEL_MARKERS.get(model, "^"),
                color=method_color(method),
                ms=6,
                label=f"{method}, {model}, {'recompute' if gc else 'no recompute'} ({sweep})",
            )
        ax.axhline(1.0, color="0.3", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(f"{name}: strongest LoRA-family / LeMo (x)")
        ax.set_title(
            f"(a) {name} ratio vs strongest of lora, lora-liger\n(same run, any backend; >1: LeMo better)", fontsize=10
        )
        ax.grid(alpha=0.3)
        if r.empty:
            ax.text(0.5, 0.5, "no sweep results", ha="center", va="center", transform=ax.transAxes, color="0.5")
    handles, labels = axes[0].get_legend_handles_labels()
    if labels:
        fig.legend(
            handles,
            labels,
            loc="lower left",
            bbox_to_anchor=(0.02, 0.0),
            ncol=2,
            fontsize=7,
            frameon=False,
            title="colour: LeMo variant; marker: model (o llama2-7b, s llama3-8b); dotted: recomputation; "
            "H200 sweep in brackets",
            title_fontsize=7,
        )
    front_csv = results / "accuracy" / "smollm2" / "frontier.csv"
    if front_csv.exists():
        ref = results / "reference" / "jenga_ae_a800.csv"
        draw_frontier(
            axes[2],
            pd.read_csv(front_csv),
            paper_points(ref) if ref.exists() else [],
            title="(b) quality-memory frontier: perplexity vs LoRA at 32K (%)\n"
            "SmolLM2-135M after 4x extension; hollow stars: the paper",
        )
    else:
        axes[2].remove()
    fig.suptitle("LeMo against dense LoRA: memory, speed and quality (committed results only)", fontsize=12)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
