"""Max-context search results (lemo.bench.maxctx result.json files) -> max_context.csv, a table and a bar figure.

The table compares each method with the best LoRA-family row (lora, lora-*, any backend) of the same
model and cap: the "vs best LoRA" column is max_context / that row's max_context.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

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
    "probes",
    "device_total_gib",
    "config",
]


def is_lora_family(method: str) -> bool:
    """By label (lora, lora-liger-offload, ...); results.LORA_FAMILY names the Methods themselves."""
    return method == "lora" or method.startswith("lora-")


def results_frame(paths) -> pd.DataFrame:
    rows = []
    for path in paths:
        r = json.loads(Path(path).read_text())
        row = {c: r.get(c) for c in COLUMNS if c in r}
        row.update(probes=len(r["probes"]), config=json.dumps(r["options"], sort_keys=True))
        row.update({c: r["provenance"].get(c) for c in PROV_COLS})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=COLUMNS + PROV_COLS)
    return frame.sort_values(["model", "cap_gib", "method", "attention"], na_position="last").reset_index(drop=True)


def write_csv(paths, out_csv: Path) -> pd.DataFrame:
    frame = results_frame(sorted(paths))
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_csv, index=False)
    return frame


def _cap(v) -> str:
    return "full GPU" if pd.isna(v) else f"{v:g} GiB"


def _tokens(n) -> str:
    return f"{int(n) // 1024}K" if n and int(n) % 1024 == 0 else str(int(n))


def table(frame: pd.DataFrame) -> str:
    head = ["model", "memory cap", "method", "attention", "recompute", "max context", "step (s)"]
    head += ["peak allocated (GiB)", "bound", "vs best LoRA-family"]
    lines = []
    for (model, cap), grp in frame.groupby(["model", frame.cap_gib.fillna(-1)], sort=True):
        lora = grp[grp.method.map(is_lora_family)]
        best = lora.max_context.max() if len(lora) else None
        for r in grp.sort_values("max_context", ascending=False).itertuples():
            ratio = f"{r.max_context / best:.2f}x" if best else ""
            step = "" if pd.isna(r.step_s) else f"{r.step_s:.1f}"
            peak = "" if pd.isna(r.peak_gib) else f"{r.peak_gib:.1f}"
            lines.append(
                [str(model), _cap(r.cap_gib), str(r.method), str(r.attention), str(r.gradient_checkpointing)]
                + [_tokens(r.max_context), step, peak, str(r.bound), ratio]
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
            "",
            table(frame),
            "",
        ]
    )


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
        for y, r in enumerate(grp.itertuples()):
            ax.text(r.max_context / 1024, y, f" {_tokens(r.max_context)} ({r.bound})", va="center", fontsize=8)
        ax.set_xlim(0, 1.4 * max(grp.max_context.max(), 1) / 1024)  # room for the labels
        ax.set_xlabel("max trainable context (K tokens)")
        ax.set_title(f"max trainable context (K tokens), {model}, {_cap(grp.cap_gib.iloc[0])}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # long method labels widen the figure, not clip the title
    plt.close(fig)
    return out
