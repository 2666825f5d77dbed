"""The real-model quality report: fidelity screen, context extension with retrieval, and the frontier.

Reads what the smollm2 experiment wrote (runs/<label>[.s<seed>]/eval.json, fidelity_x<factor>.csv) and
the H200 memory sweep of the same variants (results/h200-frontier/sweep.csv), and writes
accuracy.csv, fidelity.csv, summary.md and the figures. A label fine-tuned with several seeds is
reported as the mean over seeds with the half-range (max - min) / 2 as its spread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..bench.figures import method_color
from ..bench.goals import goals
from .fidelity import summarize

BASE_LABELS = ("pretrained", "pretrained+PI")
# Where the project's quality goals sit (issue #11), against dense LoRA in the same experiment.


def collect_runs(runs: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(Path(runs).glob("*/eval.json")):
        rows += json.loads(path.read_text())
    if not rows:
        raise FileNotFoundError(f"no */eval.json under {runs}")
    df = pd.DataFrame(rows)
    df["run"] = df["label"]
    df["label"] = df["label"].str.replace(r"\.s\d+$", "", regex=True)
    return df


def _spread(x: pd.Series) -> float:
    return (x.max() - x.min()) / 2 if len(x) > 1 else float("nan")


def perplexity(df: pd.DataFrame) -> pd.DataFrame:
    """label x context: mean perplexity over seeds, spread, seeds, delta vs lora (%)."""
    p = df[df.metric == "perplexity"].groupby(["label", "context"])["value"]
    out = pd.DataFrame({"ppl": p.mean(), "spread": p.agg(_spread), "seeds": p.count()}).reset_index()
    lora = out[out.label == "lora"].set_index("context")["ppl"]
    out["delta_pct"] = 100 * (out["ppl"] / out["context"].map(lora) - 1)
    # each seed's own delta against lora's mean: the spread of the delta
    per_seed = df[df.metric == "perplexity"].assign(d=lambda f: 100 * (f["value"] / f["context"].map(lora) - 1))
    out = out.merge(
        per_seed.groupby(["label", "context"])["d"].agg(_spread).rename("delta_spread").reset_index(),
        on=["label", "context"],
    )
    return out


def retrieval(df: pd.DataFrame) -> pd.DataFrame:
    """label x task x length: exact accuracy (points) averaged over depths and seeds; delta vs lora."""
    r = df[df.metric.isin(["passkey", "kv"])]
    if r.empty:
        return pd.DataFrame()
    per_run = r.groupby(["label", "run", "metric", "context"])["value"].mean().reset_index()
    g = per_run.groupby(["label", "metric", "context"])["value"]
    out = pd.DataFrame(
        {"acc_pts": 100 * g.mean(), "spread_pts": 100 * g.agg(_spread), "seeds": g.count()}
    ).reset_index()
    lora = out[out.label == "lora"].set_index(["metric", "context"])["acc_pts"]
    out["delta_pts"] = out["acc_pts"] - [lora.get((m, c), float("nan")) for m, c in zip(out.metric, out.context)]
    return out


def memory_ratios(sweep_csv: Path) -> pd.DataFrame:
    """label -> LoRA / label peak allocated memory (same run), step-time ratio, from the frontier sweep."""
    s = pd.read_csv(sweep_csv)
    s = s[(s.status == "ok") & s.metric.isin(["peak_allocated_gib", "step_s"])]
    wide = s.pivot_table(index="method", columns="metric", values="value")
    lora = wide.loc["lora"]
    return pd.DataFrame(
        {
            "peak_gib": wide["peak_allocated_gib"],
            "memory_ratio": lora["peak_allocated_gib"] / wide["peak_allocated_gib"],
            "speed_ratio": lora["step_s"] / wide["step_s"],
        }
    ).reset_index(names="label")


def frontier(ppl: pd.DataFrame, ret: pd.DataFrame, mem: pd.DataFrame | None, context: int) -> pd.DataFrame:
    """One row per fine-tuned label: perplexity delta at `context`, retrieval delta, 7B memory ratio."""
    f = ppl[ppl.context == context][["label", "ppl", "delta_pct", "delta_spread", "seeds"]]
    if not ret.empty:
        mean_ret = ret.groupby("label")[["acc_pts", "delta_pts"]].mean().reset_index()
        f = f.merge(mean_ret, on="label", how="left")
    if mem is not None:
        f = f.merge(mem, on="label", how="left")
        q = goals().quality
        ok = (f["delta_pct"] <= q.ppl_delta_pct) & (f["memory_ratio"] >= q.memory_ratio)
        if "delta_pts" in f:
            ok &= f["delta_pts"] >= q.retrieval_delta_pts
        f["meets_goal"] = ok.where(f["memory_ratio"].notna() & ~f.label.isin(["lora", *BASE_LABELS]))
    return f


def _md(df: pd.DataFrame, floatfmt=".3f") -> str:
    return df.to_markdown(index=False, floatfmt=floatfmt)


def paper_points(reference_csv: Path) -> list[dict]:
    """The paper's Llama-2-7B quality deltas (LoRA -> LeMo perplexity, workflows/goals.yaml) at its own
    artifact's memory saving at 8K (reference CSV: LoRA / LeMo peak allocated, A800, no recomputation)."""
    ref = pd.read_csv(reference_csv)
    at = ref[(ref.metric == "peak_allocated_mib") & (ref.model == "llama2") & (ref.context == 8192) & ~ref.recompute]
    by = at.set_index("method").value
    ratio = by["lora"] / by["jenga"]
    return [
        {"label": f"paper {data} {ctx // 1024}K", "memory_ratio": ratio, "ppl_delta_pct": 100 * (lemo / lora - 1)}
        for data, ctx, lora, lemo in ((p.dataset, p.context, p.lora, p.lemo) for p in goals().paper_perplexity)
    ]


def draw_frontier(ax, front: pd.DataFrame, paper: list[dict], title: str | None = None) -> None:
    """The quality-memory frontier on one axis: measured variants filled (method colours), the paper's
    points hollow stars in LeMo's paper colour, the goals as dashed lines (also the headline figure's panel)."""
    f = front.dropna(subset=["memory_ratio"])
    for r in f.itertuples():
        seeds = f"{int(r.seeds)} seeds" if r.seeds > 1 else "1 seed"
        ax.errorbar(
            r.memory_ratio,
            r.delta_pct,
            yerr=None if pd.isna(r.delta_spread) else r.delta_spread,
            fmt="o",
            color=method_color(r.label),
            capsize=3,
            label=f"{r.label} ({seeds})",
        )
    for i, p in enumerate(paper):  # labelled beside the star, left of it: the variants are named in the legend
        ax.scatter(
            p["memory_ratio"],
            p["ppl_delta_pct"],
            marker="*",
            s=140,
            facecolors="none",
            linewidths=1.3,
            edgecolors=method_color("lemo-paper"),
            label="LeMo: paper (Llama-2-7B; memory from the A800 artifact)" if i == 0 else None,
        )
        ax.annotate(
            p["label"],
            (p["memory_ratio"], p["ppl_delta_pct"]),
            textcoords="offset points",
            xytext=(-6, 0),
            ha="right",
            va="center",
            fontsize=7,
        )
    ax.axhline(goals().quality.ppl_delta_pct, color="grey", ls="--", lw=0.8)
    ax.axvline(goals().quality.memory_ratio, color="grey", ls="--", lw=0.8)
    ax.set_yscale("symlog", linthresh=10)  # the paper's schedule sits an order of magnitude above the rest
    top = max([10.0, f.delta_pct.max() * 1.5 if len(f) else 10.0] + [p["ppl_delta_pct"] * 1.5 for p in paper])
    ticks = [t for t in (-5, 0, 2, 5, 10, 20, 50, 100, 200) if t <= top]
    ax.set_yticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
    ax.set_xlabel("peak-memory saving vs LoRA at 8K, Llama-2-7B shape (x, H200)")
    ax.set_ylabel("perplexity vs LoRA at 32K (%)")
    ax.set_title(
        title
        or "perplexity vs LoRA at 32K (%) after 4x extension, against memory saving\n"
        "(SmolLM2-135M; hollow stars: the paper, Llama-2-7B)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def frontier_figure(front: pd.DataFrame, out: Path, paper: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    draw_frontier(ax, front, paper)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def fidelity_figure(table: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table[table.variant != "dense"]
    contexts = sorted(t.context.unique())
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * t.variant.nunique() + 2), sharey=True)
    variants = list(dict.fromkeys(t.sort_values("grad_cos").variant))
    height = 0.8 / len(contexts)
    for metric, ax, title in (
        ("loss_delta_pct", axes[0], "training-forward loss vs dense (%)"),
        ("grad_cos", axes[1], "LoRA-gradient cosine vs dense"),
    ):
        for j, c in enumerate(contexts):
            v = t[t.context == c].set_index("variant").reindex(variants)[metric]
            ax.barh([i + j * height for i in range(len(variants))], v, height=height, label=f"{c // 1024}K")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_xscale("symlog", linthresh=1)
    axes[1].axvline(0.9, color="grey", ls="--", lw=0.8)
    axes[0].set_yticks([i + 0.4 - height / 2 for i in range(len(variants))], variants, fontsize=8)
    axes[1].legend(title="context", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def readme_block(front: pd.DataFrame, fidelity: pd.DataFrame | None) -> str:
    """The README's short version: the frontier, and the fidelity screen at the longest context."""
    cols = ["label", "delta_pct", "delta_spread", "seeds", "acc_pts", "memory_ratio", "speed_ratio"]
    f = front[[c for c in cols if c in front]].rename(
        columns={
            "label": "method",
            "delta_pct": "ppl vs LoRA at 32K (%)",
            "delta_spread": "seed spread (pts of %)",
            "acc_pts": "retrieval (exact, %)",
            "memory_ratio": "memory saving, 8K 7B",
            "speed_ratio": "speed, 8K 7B",
        }
    )
    text = _md(f.sort_values("memory saving, 8K 7B"), ".2f")
    if fidelity is not None:
        longest = fidelity.context.max()
        t = fidelity[(fidelity.context == longest) & (fidelity.variant != "dense")]
        t = t[["variant", "loss_delta_pct", "grad_cos", "mass_all_queries_layer_mean", "share_kept_all"]].rename(
            columns={
                "loss_delta_pct": "training loss vs dense (%)",
                "grad_cos": "LoRA-gradient cosine",
                "mass_all_queries_layer_mean": "attention mass kept",
                "share_kept_all": "tokens kept in all layers",
            }
        )
        text += (
            f"\n\nFidelity screen at {longest // 1024}K (RoPE x4, no training; loss of `loss_tokens: kept` "
            "variants is over the kept tokens):\n\n" + _md(t.sort_values("LoRA-gradient cosine", ascending=False))
        )
    return text


def write_quality_report(
    runs: Path,
    fidelity_dir: Path,
    out: Path,
    figures: Path,
    sweep_csv: Path | None,
    paper_csv: Path | None = None,
    readme: Path | None = None,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    written = []
    parts = ["# Quality on SmolLM2-135M (generated by `lemo quality-report`)\n"]
    fid_frames = [pd.read_csv(p) for p in sorted(Path(fidelity_dir).glob("fidelity_x*.csv"))]
    table = None
    if fid_frames:
        fid = pd.concat(fid_frames)
        fid.to_csv(out / "fidelity.csv", index=False)
        table = summarize(fid.to_dict("records"))
        fidelity_figure(table, figures / "fidelity.png")
        written += [out / "fidelity.csv", figures / "fidelity.png"]
        cols = [
            "context",
            "variant",
            "loss_delta_pct",
            "grad_cos",
            "grad_cos_layer_mean",
            "mass_kept_queries_layer_mean",
            "mass_all_queries_layer_mean",
            "share_kept_all",
            "nll_eliminated_last",
            "dense_nll_eliminated_last",
        ]
        parts.append(
            "## Fidelity screen (no training; LeMo's training forward + backward vs dense)\n\n"
            + _md(table[[c for c in cols if c in table]])
            + "\n"
        )
    df = collect_runs(runs)
    df.to_csv(out / "accuracy.csv", index=False)
    written.append(out / "accuracy.csv")
    ppl = perplexity(df)
    ret = retrieval(df)
    parts.append("## Perplexity after 8K -> 32K extension (mean over seeds; spread = half-range)\n\n" + _md(ppl) + "\n")
    if not ret.empty:
        parts.append("## Retrieval (exact answers, points; mean over depths and seeds)\n\n" + _md(ret, ".1f") + "\n")
    mem = memory_ratios(sweep_csv) if sweep_csv is not None and Path(sweep_csv).exists() else None
    longest = int(ppl.context.max())
    front = frontier(ppl, ret, mem, longest)
    front.to_csv(out / "frontier.csv", index=False)
    written.append(out / "frontier.csv")
    parts.append(
        f"## Frontier: quality at {longest // 1024}K against memory saving at 8K (Llama-2-7B, H200)\n\n"
        f"Goal: perplexity within +{goals().quality.ppl_delta_pct}% of LoRA, retrieval within "
        f"{-goals().quality.retrieval_delta_pts:.0f} points, memory saving >= {goals().quality.memory_ratio}x.\n\n"
        + _md(front)
        + "\n"
    )
    if mem is not None:
        paper = paper_points(paper_csv) if paper_csv is not None and Path(paper_csv).exists() else []
        frontier_figure(front, figures / "frontier.png", paper)
        written.append(figures / "frontier.png")
    (out / "summary.md").write_text("\n".join(parts))
    written.append(out / "summary.md")
    if readme is not None:
        from ..bench.report import update_readme

        update_readme(readme, f"quality-{out.name}", readme_block(front, table))
        written.append(readme)
    return written
