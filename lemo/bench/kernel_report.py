"""Kernel microbenchmarks -> one table per kernel and one figure per kernel, against measured ceilings.

Each `workflows/scripts/bench_KERNEL.py` writes its own CSV; `SPECS` says how to read it: which column
names the implementation, which extra columns split the rows (e.g. GQA or not), the naive path the
kernel is compared with, and which achieved rate is set against which ceiling of `ceilings.csv`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .results import markdown_table  # noqa: E402


@dataclass(frozen=True)
class Spec:
    title: str
    impl: list[str]  # columns whose values name an implementation
    baselines: tuple[str, ...]  # naive paths, compared with `fast`
    fast: str
    split: tuple[str, ...] = ()  # columns besides the context that split rows
    memory: str = "extra_mib"
    # Achieved-rate columns of the fast implementation, each with the row of ceilings.csv it is held to.
    rates: tuple[tuple[str, str], ...] = ()


SPECS = {
    "block_scores": Spec(
        "Block scores (oracle scoring)",
        ["impl"],
        ("torch",),
        "triton",
        ("hq", "hkv"),
        rates=(("tflops", "matmul_bf16"),),
    ),
    "movement": Spec(
        "Token movement of one sparse layer (forward + backward)",
        ["impl"],
        ("naive", "torch"),
        "triton",
        memory="peak_extra_mib",
        rates=(("gbps", "copy_d2d"),),
    ),
    "cross_entropy": Spec(
        "LM head + cross-entropy (forward + backward)",
        ["impl"],
        ("plain", "torch", "liger"),
        "triton",
        rates=(("matmul_tflops", "matmul_bf16"), ("ce_kernel_gbps", "copy_d2d")),
    ),
    "predictors": Spec(
        "Block selection scores, 16 sparse layers",
        ["scorer", "widths"],
        ("oracle",),
        "predictor 128,64",
        memory="peak_extra_mib",
    ),
}


def _load(path: Path, spec: Spec) -> pd.DataFrame:
    d = pd.read_csv(path)
    if "status" in d:
        d = d[d.status.fillna("ok") == "ok"]
    d = d.copy()
    d["impl_name"] = d[spec.impl].fillna("").astype(str).agg(lambda r: " ".join(v for v in r if v), axis=1)
    d["variant"] = (
        d[list(spec.split)].astype(str).apply(lambda r: " ".join(f"{c}={v}" for c, v in r.items()), axis=1)
        if spec.split
        else ""
    )
    return d


def _ceilings(paths: list[Path]) -> dict:
    for p in paths:
        if p.stem == "ceilings":
            c = pd.read_csv(p)
            c = c[c.status.fillna("ok") == "ok"] if "status" in c else c
            return {r.ceiling: (r.value, r.unit) for r in c.itertuples()}
    return {}


def kernel_table(d: pd.DataFrame, spec: Spec, ceilings: dict) -> str:
    impls = [i for i in [*spec.baselines, spec.fast] if i in set(d.impl_name)]
    extra = [i for i in dict.fromkeys(d.impl_name) if i not in impls]
    impls += extra
    head = ["context"] + (["variant"] if spec.split else []) + [f"{i} (ms)" for i in impls]
    head += [f"{spec.fast} vs {b}" for b in spec.baselines if b in impls] + [f"{i} extra MiB" for i in impls]
    for rate, ceiling in spec.rates:
        cap, unit = ceilings.get(ceiling, (None, None))
        head.append(f"{spec.fast} {rate}" + (f" (% of {cap:.0f} {unit})" if cap else ""))
    rows = []
    for (context, variant), g in d.groupby(["context", "variant"]):
        by = {r.impl_name: r for r in g.itertuples()}
        cells = [str(context)] + ([variant] if spec.split else [])
        cells += [f"{by[i].ms:.2f}" if i in by else "" for i in impls]
        for b in spec.baselines:
            if b in impls:
                cells.append(f"{by[b].ms / by[spec.fast].ms:.1f}x" if b in by and spec.fast in by else "")
        cells += [f"{getattr(by[i], spec.memory):.0f}" if i in by else "" for i in impls]
        for rate, ceiling in spec.rates:
            r = by.get(spec.fast)
            value = getattr(r, rate) if r is not None else float("nan")
            cap = ceilings.get(ceiling, (None,))[0]
            cells.append("" if pd.isna(value) else f"{value:.0f}" + (f" ({100 * value / cap:.0f}%)" if cap else ""))
        rows.append(cells)
    return markdown_table(head, rows)


# One colour per implementation in every kernel figure (liger in lora-liger's colour); others: method_color.
IMPL_COLORS = {
    "triton": "#d62728",
    "torch": "#1f77b4",
    "naive": "#7f7f7f",
    "plain": "#7f7f7f",
    "liger": "#17becf",
    "oracle": "#1f77b4",
}


def impl_color(impl: str) -> str:
    from .figures import method_color

    return IMPL_COLORS.get(impl, method_color(impl))


def kernel_figure(d: pd.DataFrame, spec: Spec, name: str, out: Path, ceilings: dict | None = None) -> Path:
    """Time per implementation (colour: the implementation, as in every kernel figure; solid: the fast
    one) and, where the spec names rates, the fast implementation's achieved rate against the measured
    ceiling (a labelled horizontal line)."""
    ceilings = ceilings or {}
    rates = [(r, c) for r, c in spec.rates if r in d and d[r].notna().any()]
    fig, axes = plt.subplots(1, 1 + len(rates), figsize=(6 + 4.5 * len(rates), 4.2), squeeze=False)
    ax = axes[0][0]
    markers = ["o", "s", "^", "v", "D", "P"]
    variants = list(dict.fromkeys(d.variant))
    for (impl, variant), g in d.groupby(["impl_name", "variant"]):
        g = g.sort_values("context")
        ax.plot(
            g.context,
            g.ms,
            marker=markers[variants.index(variant) % len(markers)],
            color=impl_color(impl),
            label=f"{impl} {variant}".strip(),
            linestyle="-" if impl == spec.fast else "--",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("time (ms, median)")
    ax.set_title("time per call (ms, median; lower is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for rax, (rate, ceiling) in zip(axes[0][1:], rates):
        fast = d[d.impl_name == spec.fast]
        for variant, g in fast.groupby("variant"):
            g = g.sort_values("context")
            rax.plot(
                g.context,
                g[rate],
                marker=markers[variants.index(variant) % len(markers)],
                color=impl_color(spec.fast),
                label=f"{spec.fast} {variant}".strip(),
            )
        cap, unit = ceilings.get(ceiling, (None, ""))
        if cap:
            rax.axhline(cap, color="0.3", ls="--", lw=1)
            rax.annotate(
                f"measured ceiling: {ceiling} {cap:.0f} {unit}",
                (0.02, cap),
                xycoords=("axes fraction", "data"),
                xytext=(0, -3),
                textcoords="offset points",
                va="top",
                fontsize=7,
                color="0.3",
            )
            rax.set_ylim(0, max(cap, fast[rate].max()) * 1.08)
        rax.set_xscale("log", base=2)
        rax.set_xlabel("tokens")
        rax.set_ylabel(f"{rate} ({unit})" if unit else rate)
        rax.set_title(f"achieved {rate} of {spec.fast}" + (" vs measured ceiling" if cap else ""), fontsize=10)
        rax.grid(alpha=0.3)
        rax.legend(fontsize=7, loc="center right")
    fig.suptitle(spec.title, fontsize=11)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def kernel_report(paths: list[Path], out: Path, figures: Path) -> list[Path]:
    paths = [Path(p) for p in paths]
    ceilings = _ceilings(paths)
    figures.mkdir(parents=True, exist_ok=True)
    parts, written = [], []
    if ceilings:
        first = pd.read_csv(next(p for p in paths if p.stem == "ceilings")).iloc[0]
        parts.append(
            f"Measured ceilings on {first.gpu}: "
            + ", ".join(f"{k} {v:.0f} {u}" for k, (v, u) in ceilings.items())
            + f" (commit `{str(first.git_commit)[:10]}`)."
        )
    for p in paths:
        if p.stem == "block_scores_tuning":
            from .kernel_roofline import tuning_section

            parts.append(tuning_section(p, ceilings))
            continue
        if p.stem == "block_scores_ncu":
            from .kernel_roofline import ncu_section

            parts.append(ncu_section(p))
            continue
        if p.stem not in SPECS:
            continue
        spec = SPECS[p.stem]
        d = _load(p, spec)
        parts += [f"**{spec.title}** (`{p.name}`)", kernel_table(d, spec, ceilings)]
        written.append(kernel_figure(d, spec, p.stem, figures, ceilings))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts) + "\n")
    return [out] + written
