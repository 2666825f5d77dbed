"""Where we stand against each project target, read off committed results (never typed by hand).

Each row names the files it was read from; a target whose files are missing says "not measured".
Ratio targets compare LeMo with the strongest LoRA-family baseline measured in the same run (same
commit and point, any backend: the lowest memory or time among lora, lora-liger, offloaded or not),
plain LoRA on LeMo's backend beside it; the best LeMo variant per target whose perplexity kept the quality
goal on the real model is shown (results/accuracy/*/frontier.csv), further-reaching untested or failed
variants named beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .goals import RatioTarget, goals
from .kernel_report import SPECS, _ceilings, _load
from .report import largest_memory_view, target_points
from .results import markdown_table, strongest_ratios, wide

# The sweeps each ratio target is looked for in (all that exist are read).
# The options that make a LeMo row "the default method" (kernels and scorer aside: they change speed, not
# which tokens train).
METHOD_FIELDS = (
    "keep_ratio",
    "selection",
    "threshold",
    "sparse_layers",
    "sparse_first",
    "block_size",
    "keep_first_block",
    "keep_last_block",
    "mlp_mode",
    "eliminated",
    "shared_selection",
    "loss_tokens",
    "mlp_keep_channels",
    "mlp_channel_all_layers",
    "min_sparse_tokens",
)
# Baseline values of one setup differ this much between runs at most (noise); a run whose strongest
# LoRA-family value is further above another run's lacks that stronger baseline.
RUN_TO_RUN = 0.05


@dataclass
class Row:
    target: str
    goal: str
    measured: str
    met: str
    source: str


def _mark(ok: bool | None) -> str:
    return "not measured" if ok is None else ("yes" if ok else "no")


def ratio_target(results: Path, target: RatioTarget) -> Row:
    """The best LeMo variant's ratio at a ratio target's point (workflows/goals.yaml) against the strongest
    LoRA-family row of the same run (any backend), over the runs that hold the strongest baseline measured
    anywhere (within run-to-run noise): a run without it (e.g. no lora-liger) would flatter LeMo. Plain LoRA's
    beside it."""
    label, model, goal, paper = target.label, target.model, target.goal, target.paper
    found = []
    for name in goals().target_sweeps:
        csv = results / name / "sweep.csv"
        if csv.exists():
            found += [(row, csv) for row in target_points(pd.read_csv(csv), target, same_run=True).itertuples()]
    label, goal_text = f"{label}, {model}", f"{goal:.2f}x vs the strongest LoRA (paper {paper:.2f}x vs plain LoRA)"
    if not found:
        return Row(label, goal_text, "", _mark(None), "")
    strongest = min(row.base for row, _ in found)
    fair = [(row, csv) for row, csv in found if row.base <= (1 + RUN_TO_RUN) * strongest]
    # only a variant whose perplexity kept the quality goal on the real model counts: a memory or time ratio
    # bought with quality, or with quality nobody measured, is not one a user can take
    verdicts = quality_verdicts(results)
    by_verdict = {"kept": [], "failed": [], "untested": []}
    for row, csv in sorted(fair, key=lambda pair: -pair[0].ratio):  # best first within each verdict
        by_verdict[_verdict(row.method, verdicts)].append((row, csv))
    if not by_verdict["kept"]:
        best, csv = max(fair, key=lambda pair: pair[0].ratio)
        return Row(
            label, goal_text, f"no variant with its quality kept; best: {_unkept(best, verdicts)}", "no", str(csv)
        )
    r, csv = by_verdict["kept"][0]
    plain = "not in the run" if pd.isna(r.lora_ratio) else f"{r.lora_ratio:.3f}x (lora {r.lora:.2f})"
    text = (
        f"{r.ratio:.3f}x: {r.base_method} ({r.base_attention}) {r.base:.2f}, {r.method} ({r.attention}) "
        f"{r.value:.2f}, one run with {r.baselines}; vs plain LoRA on {r.attention}: {plain}"
    )
    for verdict in ("untested", "failed"):  # the best of each that goes further, named beside
        if by_verdict[verdict] and by_verdict[verdict][0][0].ratio > r.ratio:
            text += f"; {_unkept(by_verdict[verdict][0][0], verdicts)}"
    return Row(label, goal_text, text, _mark(r.ratio >= goal), str(csv))


def _verdict(method: str, verdicts: dict) -> str:
    """kept / failed / untested: a LeMo variant's perplexity against the quality goal (quality_verdicts)."""
    found = verdicts.get(_quality_label(method))
    if found is None:
        return "untested"
    return "kept" if found[0] <= goals().quality.ppl_delta_pct else "failed"


def _quality_label(method: str) -> str:
    """A memory sweep's LeMo label -> its label in the quality experiments (Liger changes no numbers)."""
    return method.removesuffix("-liger")


def _unkept(row, verdicts) -> str:
    """A variant that does not count for a ratio target, and why."""
    found = verdicts.get(_quality_label(row.method))
    why = "its quality is untested" if found is None else f"its perplexity is {found[0]:+.2f}% vs LoRA ({found[1]})"
    return f"{row.method} reaches {row.ratio:.3f}x but {why}"


def quality_verdicts(results: Path) -> dict[str, tuple[float, str]]:
    """Every label of a committed quality experiment (results/accuracy/*/frontier.csv) -> its worst perplexity
    delta after extension in % (over the experiments that ran it) and that experiment's file."""
    out: dict[str, tuple[float, str]] = {}
    for csv in sorted((results / "accuracy").glob("*/frontier.csv")):
        for row in pd.read_csv(csv).dropna(subset=["delta_pct"]).itertuples():
            if row.label not in out or row.delta_pct > out[row.label][0]:
                out[row.label] = (float(row.delta_pct), str(csv.relative_to(results.parent)))
    return out


def _is_default(description: str) -> bool:
    """A record's resolved LeMo options (its method description, "LoRA + LeMo {json}", written when it ran)
    hold today's default in every METHOD_FIELDS field; a record older than one of those fields is not."""
    from lemo import LeMoConfig

    if not isinstance(description, str) or "LeMo {" not in description:
        return False
    if "min_sparse_tokens calibrated" in description:  # its min_sparse_tokens was chosen in the run, not 0
        return False
    try:
        resolved = json.loads(description[description.index("{") :].split(" + ")[0])
    except ValueError:
        return False
    default = LeMoConfig()
    return all(f in resolved and resolved[f] == getattr(default, f) for f in METHOD_FIELDS)


def never_slower_target(results: Path) -> Row:
    """The default LeMo's step time against the fastest LoRA-family row of the same run, at every point
    any committed sweep measured it: the slowest of those ratios."""
    label = "never slower than LoRA: the default LeMoConfig at every measured point"
    goal = ">= 1.00x step time vs the fastest LoRA-family row of the run"
    found = []
    for name in goals().target_sweeps:
        csv = results / name / "sweep.csv"
        if not csv.exists():
            continue
        frame = pd.read_csv(csv)
        if "method_description" not in frame:  # aggregated before the column existed: re-run lemo aggregate
            continue
        default = {m for m, d in frame.groupby("method").method_description.first().items() if _is_default(d)}
        r = strongest_ratios(frame, "step_s")
        found += [(row, name) for row in r[r.method.isin(default)].itertuples()]
    if not found:
        return Row(label, goal, "", _mark(None), "")
    worst, where = min(found, key=lambda pair: pair[0].ratio)
    text = (
        f"slowest {worst.ratio:.2f}x over {len(found)} points in {len({n for _, n in found})} sweeps: "
        f"{worst.model} {worst.context // 1024}K {'with' if worst.gradient_checkpointing else 'without'} "
        f"recomputation, {worst.method} ({worst.attention}) {worst.value:.3f} s vs {worst.base_method} "
        f"({worst.base_attention}) {worst.base:.3f} s in {where}"
    )
    return Row(
        label, goal, text, _mark(worst.ratio >= 1.0), ", ".join(sorted({f"results/{n}/sweep.csv" for _, n in found}))
    )


def budget_target(results: Path) -> Row:
    b = goals().budgets[0]
    label, model, gc, context, budget = b.label, b.model, b.gradient_checkpointing, b.context, b.budget_gib
    csv = results / "h200-256k" / "sweep.csv"
    if not csv.exists():
        return Row(label, f"<= {budget:.0f} GiB", "", _mark(None), "")
    w = wide(pd.read_csv(csv))
    w = w[(w.model == model) & (w.gradient_checkpointing == gc) & (w.context == context)]
    w = w.assign(peak=largest_memory_view(w))
    ok = w[w.status == "ok"].sort_values("peak")
    lora = w[w.method == "lora"]
    lora_text = f"; lora: {lora.status.iloc[0].upper()}" if len(lora) else ""
    if not len(ok):
        return Row(label, f"<= {budget:.0f} GiB", "no method ran" + lora_text, "no", str(csv))
    r = ok.iloc[0]
    return Row(
        label,
        f"<= {budget:.0f} GiB",
        f"{r.peak:.1f} GiB, largest of allocator/NVML peaks ({r.method}, {r.step_s:.0f} s/step){lora_text}",
        _mark(r.peak <= budget),
        str(csv),
    )


def perplexity_target(accuracy_csv: Path, goal_pct: float = 2.0) -> Row:
    label = "perplexity after context extension vs dense LoRA (17M toy model pretrained here)"
    goal = f"within +{goal_pct:.0f}%"
    if not accuracy_csv.exists():
        return Row(label, goal, "", _mark(None), "")
    a = pd.read_csv(accuracy_csv)
    a = a[a.metric == "perplexity"]
    extended = json.loads(a.finetune_config.iloc[0])["context"]
    at = a[a.context == extended].set_index("label").value
    rel = {m: 100 * (v / at["lora"] - 1) for m, v in at.items() if m.startswith("lemo")}
    defaults = [m for m in ("lemo-token", "lemo-channel", "lemo-predictor") if m in rel]
    best = min(rel, key=rel.get)
    text = ", ".join(f"{m} {rel[m]:+.1f}%" for m in defaults)
    text += f" at {extended} tokens; best ablation {best} {rel[best]:+.1f}%"
    return Row(label, goal, text, _mark(all(rel[m] <= goal_pct for m in defaults)), str(accuracy_csv))


def quality_rows(quality_dir: Path) -> list[Row]:
    """The real model (results/accuracy/smollm2): perplexity and retrieval after 4x extension at a 7B-shape
    memory saving, and the LoRA-gradient cosine of the fidelity screen (goals: workflows/goals.yaml)."""
    q = goals().quality
    memory_goal, ppl_goal, pts_goal, cos_goal = q.memory_ratio, q.ppl_delta_pct, -q.retrieval_delta_pts, q.grad_cosine
    label = "quality after 4x extension, real model (SmolLM2-135M): perplexity and retrieval vs LoRA, at memory saving"
    goal = f"<= +{ppl_goal:.0f}% ppl, >= -{pts_goal:.0f} pts retrieval, >= {memory_goal}x memory (8K, 7B shape)"
    front_csv, fid_csv = quality_dir / "frontier.csv", quality_dir / "fidelity.csv"
    if not front_csv.exists():
        return [Row(label, goal, "", _mark(None), "")]
    f = pd.read_csv(front_csv)
    f = f[f.label.str.startswith("lemo") & f.memory_ratio.notna()]
    lines = [
        f"{r.label} {r.delta_pct:+.1f}% ({int(r.seeds)} seed{'s' * (r.seeds > 1)}) at {r.memory_ratio:.2f}x"
        for r in f.sort_values("delta_pct").itertuples()
    ]
    retrieval = f.acc_pts.max() if "acc_pts" in f else float("nan")
    text = "; ".join(lines) + (
        f"; retrieval: every method incl. LoRA at {retrieval:.0f} points (uninformative)" if retrieval == 0 else ""
    )
    met = bool(f.meets_goal.fillna(False).astype(bool).any()) if "meets_goal" in f else None
    mark = _mark(met)
    if met and retrieval == 0:  # "within 5 points of LoRA" holds only because LoRA retrieves nothing either
        mark = "perplexity and memory yes; retrieval not tested (LoRA at 0)"
    rows = [Row(label, goal, text, mark, str(front_csv))]
    if fid_csv.exists():
        d = pd.read_csv(fid_csv)
        longest = d.context.max()
        cos = d[(d.metric == "grad_cos") & d.layer.isna() & (d.context == longest)].groupby("variant").value.mean()
        mem = f.set_index("label").memory_ratio
        sweep = quality_dir.parent.parent / "h200-frontier" / "sweep.csv"
        if sweep.exists():
            from ..accuracy.quality import memory_ratios

            mem = memory_ratios(sweep).set_index("label").memory_ratio
        lean = cos[[v for v in cos.index if mem.get(v, 0) >= memory_goal]]
        parts = [f"best {cos.idxmax()} {cos.max():.3f} (at {mem.get(cos.idxmax(), float('nan')):.2f}x)"]
        if not lean.empty:
            parts.append(f"best at >= {memory_goal}x: {lean.idxmax()} {lean.max():.3f}")
        if "lemo-paper" in cos:
            parts.append(f"paper's lemo-paper {cos['lemo-paper']:.3f}")
        rows.append(
            Row(
                f"LoRA-gradient cosine vs dense, real model at {longest // 1024}K",
                f">= {cos_goal}",
                "; ".join(parts),
                _mark(bool((lean >= cos_goal).any())),
                str(fid_csv),
            )
        )
    return rows


def recall_target(recall_csv: Path, model: str) -> Row:
    goal, paper = goals().predictors.recall, goals().predictors.paper_recall
    label = f"predictor recall of the oracle's kept blocks ({model})"
    if not recall_csv.exists():
        return Row(label, f">= {goal:.0%}", "", _mark(None), "")
    r = pd.read_csv(recall_csv)
    context = f" at {int(r.context.iloc[0]) // 1024}K" if "context" in r else ""
    r = r[r.layer.astype(str) == "all"].set_index("selection")
    parts = [f"{sel} {row.recall:.1%} at {row.kept_fraction:.0%} kept" for sel, row in r.iterrows()]
    # met only at the oracle's budget: a threshold that keeps more blocks than the keep ratio buys its
    # recall with memory
    budget = r.kept_fraction <= 1.05 * r.keep_ratio
    return Row(
        label,
        f">= {goal:.0%} at the keep ratio's budget (paper {paper:.1%})",
        ", ".join(parts) + context,
        _mark(bool((r.recall[budget] >= goal).any())),
        str(recall_csv),
    )


def overhead_target(results: Path, context: int = 65536) -> Row:
    """Predictor scoring of all sparse layers against the step of the predictor-scored LeMo at that length."""
    goal = goals().predictors.overhead
    label = f"predictor overhead, share of a {context // 1024}K step (scoring only; top-k selection not timed)"
    bench = results / "h200-kernels" / "kernels" / "predictors.csv"
    step_csv = results / "h200-target64k" / "sweep.csv"
    if not bench.exists() or not step_csv.exists():
        return Row(label, f"<= {goal:.0%}", "", _mark(None), "")
    b = pd.read_csv(bench)
    b = b[(b.scorer == "predictor") & (b.context == context)]
    steps = pd.read_csv(step_csv)
    w = wide(steps)
    cfg = steps[["method", "config"]].drop_duplicates().set_index("method").config
    scored = [m for m in w.method if m in cfg and json.loads(cfg[m]).get("lemo", {}).get("scorer") == "predictor"]
    w = w[(w.context == context) & w.method.isin(scored) & (w.status == "ok")]
    if not len(b) or not len(w):
        return Row(label, f"<= {goal:.0%}", "", _mark(None), "")
    ms, step = b.ms.max(), w.step_s.min()  # the slower predictor size: the bound holds for both
    share = ms / 1000 / step
    return Row(
        label,
        f"<= {goal:.0%}",
        f"{share:.1%} ({ms:.1f} ms of {step:.2f} s, {w.method.iloc[0]})",
        _mark(share <= goal),
        f"{bench}, {step_csv}",
    )


def kernel_rows(results: Path) -> list[Row]:
    """Each kernel's first achieved rate (kernel_report.SPECS) at its largest size, against its ceiling."""
    k = results / "h200-kernels" / "kernels"
    ceilings = _ceilings([k / "ceilings.csv"]) if (k / "ceilings.csv").exists() else {}
    if not ceilings:
        return [Row("kernels near their ceilings", "near", "", _mark(None), "")]
    rows = []
    for name, spec in SPECS.items():
        path = k / f"{name}.csv"
        if not spec.rates or not path.exists():
            continue
        if name == "block_scores" and (k / "block_scores_tuning.csv").exists():
            continue  # block_score_kernel_target reads the tuning run, which measured today's launch config
        rate, ceiling = spec.rates[0]
        d = _load(path, spec)
        d = d[(d.impl_name == spec.fast) & d[rate].notna()]
        if not len(d) or ceiling not in ceilings:
            continue
        cap, unit = ceilings[ceiling]
        top = d[d.context == d.context.max()][rate] / cap
        span = f"{top.max():.0%}" if top.max() - top.min() < 0.005 else f"{top.min():.0%}-{top.max():.0%}"
        rows.append(
            Row(
                f"kernel: {spec.title}",
                "near the ceiling",
                f"{span} of {cap:.0f} {unit} ({rate}) at {int(d.context.max())} tokens",
                "-",
                str(path),
            )
        )
    return rows


def max_context_target(results: Path) -> Row:
    """LeMo's longest trainable context under the cap against the best LoRA-family setup's (lemo.bench.maxctx)."""
    from .maxctx_report import is_lora_family

    g = goals().max_context
    label = f"max trainable context, Llama-2-7B shape, under a {g.cap_gib:g} GiB cap"
    goal = f">= {g.ratio:.1f}x the best LoRA-family setup"
    csv = results / "h200-maxctx" / "max_context.csv"
    if not csv.exists():
        return Row(label, goal, "", _mark(None), "")
    m = pd.read_csv(csv)
    # a search ended by an error or a dead process measured nothing about its method's limit
    m = m[(m.cap_gib == g.cap_gib) & ~m.bound.isin(["error", "killed"])]
    lora, lemo = m[m.method.map(is_lora_family)], m[m.method.str.startswith("lemo")]
    if not len(lora) or not len(lemo):
        return Row(label, goal, "", _mark(None), str(csv))
    best, ours = lora.loc[lora.max_context.idxmax()], lemo.loc[lemo.max_context.idxmax()]
    ratio = ours.max_context / best.max_context if best.max_context else float("inf")

    def text(r):
        step = "fits no probe" if not r.max_context else f"{r.step_s:.0f} s/step"
        return f"{r.method} {int(r.max_context) // 1024}K ({r.bound}, {step})"

    measured = f"{ratio:.2f}x: {text(ours)} vs {text(best)}" + _time_bound_fits(ours, best)
    return Row(label, goal, measured, _mark(ratio >= g.ratio), str(csv))  # met: measured contexts only


def _time_bound_fits(ours: pd.Series, best: pd.Series) -> str:
    """Where a search ended on "time" its measured context is only a lower bound on what memory allows: the two
    searches' memory capacities compared, each its peak-memory fit to the cap (maxctx_report.memory_fit_context)
    or, for a search that found its limit, that limit; labelled as the extrapolation it is. Empty where neither
    ended on time."""
    from .maxctx_report import MEASURED_LIMIT

    timed = [r.method for r in (ours, best) if r.bound == "time"]
    if not timed:
        return ""
    which = "both searches" if len(timed) == 2 else f"{timed[0]}'s search"
    ours_cap, best_cap = (
        r.max_context if r.bound in MEASURED_LIMIT else r.get("memory_fit_context", float("nan")) for r in (ours, best)
    )
    if pd.isna(ours_cap) or pd.isna(best_cap):
        return f"; {which} ended on time, with no peak-memory fit to extrapolate"
    return (
        f"; {which} ended on time: by peak-memory fits to the cap (a found limit where there is one) "
        f"{int(ours_cap) // 1024}K vs {int(best_cap) // 1024}K ({ours_cap / best_cap:.2f}x, extrapolated)"
    )


COMMAND_LIMIT_S = 600  # the GPU runner's limit on one command: a step must fit it with the model's setup


def full_gpu_context_target(results: Path) -> Row:
    """LeMo's longest context in one step on the whole GPU (lemo.bench.maxctx with no cap)."""
    tokens = goals().max_context.full_gpu_tokens
    label = "max trainable context, Llama-2-7B shape, whole H200, one step within the command limit"
    goal = f">= {tokens // 1024}K tokens"
    csv = results / "h200-maxctx-512k" / "max_context.csv"
    if not csv.exists():
        return Row(label, goal, "", _mark(None), "")
    m = pd.read_csv(csv)
    m = m[
        m.cap_gib.isna()
        & m.method.str.startswith("lemo")
        & ~m.bound.isin(["error", "killed", "time"])  # "time": the step ran past the search's time bound
        & (m.model == "llama2-7b")
        & m.gpu.astype(str).str.contains("H200")
        & (m.step_s <= COMMAND_LIMIT_S)
    ]
    if not len(m):
        return Row(label, goal, "", _mark(None), str(csv))
    r = m.loc[m.max_context.idxmax()]
    text = (
        f"{r.method} {int(r.max_context) // 1024}K: {r.step_s:.0f} s/step, {r.peak_gib:.1f} GiB allocated "
        f"(bound: {r.bound})"
    )
    return Row(label, goal, text, _mark(bool(r.max_context >= tokens)), str(csv))


def block_score_kernel_target(results: Path) -> Row:
    """The block-score kernel in its default launch config against the bf16 matmul ceiling, every size tuned."""
    from .kernel_roofline import default_rows, ncu_summary, tuning_frame

    goal = goals().kernels.ceiling_fraction
    label = "block-score kernel (default launch config) vs the measured bf16 matmul ceiling"
    k = results / "h200-kernels" / "kernels"
    path = k / "block_scores_tuning.csv"
    if not path.exists() or not (k / "ceilings.csv").exists():
        return Row(label, f">= {goal:.0%}", "", _mark(None), "")
    d = default_rows(tuning_frame(path, _ceilings([k / "ceilings.csv"])))
    if not len(d):
        return Row(label, f">= {goal:.0%}", "", _mark(None), str(path))
    worst = d.loc[d.of_ceiling.idxmin()]
    text = (
        f"{d.of_ceiling.min():.0%}-{d.of_ceiling.max():.0%} ({d.tflops.min():.0f}-{d.tflops.max():.0f} TFLOP/s) at "
        f"{d.context.min() // 1024}K-{d.context.max() // 1024}K; HBM roofline of its tile loads: "
        f"{worst.flop_per_byte:.0f} FLOP/byte at {worst.hq}/{worst.hkv} heads (kernel summary)"
    )
    sources = [str(path)]
    profiled = ncu_summary(k / "block_scores_ncu.csv")
    if profiled:
        text += f"; profile: {profiled}"
        sources.append(str(k / "block_scores_ncu.csv"))
    return Row(label, f">= {goal:.0%}", text, _mark(bool(d.of_ceiling.min() >= goal)), ", ".join(sources))


def target_rows(results: Path) -> list[Row]:
    results = Path(results)
    return [
        *(ratio_target(results, t) for t in goals().ratio_targets),
        never_slower_target(results),
        max_context_target(results),
        full_gpu_context_target(results),
        budget_target(results),
        *quality_rows(results / "accuracy" / "smollm2"),
        perplexity_target(results / "accuracy" / "small" / "accuracy.csv"),
        recall_target(results / "accuracy" / "smollm2" / "predictors" / "recall.csv", "SmolLM2-135M, RoPE x4"),
        recall_target(results / "accuracy" / "small" / "predictors" / "recall.csv", "17M toy model"),
        overhead_target(results),
        block_score_kernel_target(results),
        *kernel_rows(results),
    ]


def targets_table(results: Path) -> str:
    rows = [
        [r.target, r.goal, r.measured, r.met, r.source.replace(str(results), "results")] for r in target_rows(results)
    ]
    return markdown_table(["target", "goal", "measured", "met", "read from"], rows)
