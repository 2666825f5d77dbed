"""Accuracy results: runs -> accuracy.csv, a perplexity table like the paper's, and figures.

Reads every `RUNS/<label>/eval.json` (and loss.csv), plus `RUNS/pretrain/pretrain_log.csv` and
`pretrain.json` when present. Relative perplexity is against dense `lora` at the same context, with
the paper's Llama-2-7B deltas (LoRA -> LeMo) beside ours.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..bench.figures import method_color  # noqa: E402
from ..bench.goals import goals  # noqa: E402
from ..bench.report import update_readme  # noqa: E402
from ..bench.results import markdown_table  # noqa: E402

# The paper (LeMo, Table: perplexity after context extension, Llama-2-7B), LoRA -> LeMo.
ORDER = ["pretrained", "pretrained+PI", "lora", "longlora", "lemo-token", "lemo-channel", "lemo-predictor"]


def collect(runs: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(Path(runs).glob("*/eval.json")):
        rows += json.loads(path.read_text())
    if not rows:
        raise FileNotFoundError(f"no */eval.json under {runs}: run `lemo finetune` / `lemo eval-base` first")
    return pd.DataFrame(rows)


def _ctx(c: int) -> str:
    return f"{c // 1024}K" if c % 1024 == 0 else str(c)


def _order(labels) -> list[str]:
    return [m for m in ORDER if m in set(labels)] + sorted(set(labels) - set(ORDER))


def perplexity_table(frame: pd.DataFrame, baseline: str = "lora") -> str:
    ppl = frame[frame.metric == "perplexity"].pivot_table(index="label", columns="context", values="value")
    ppl = ppl.reindex(_order(ppl.index))
    contexts = list(ppl.columns)
    head = ["method"] + [_ctx(c) for c in contexts]
    lines = []
    for label, row in ppl.iterrows():
        cells = [label]
        for c in contexts:
            v = row[c]
            cell = f"{v:.3f}"
            if baseline in ppl.index and label not in (baseline, "pretrained", "pretrained+PI"):
                cell += f" ({100 * (v / ppl.loc[baseline, c] - 1):+.1f}%)"
            cells.append(cell)
        lines.append(cells)
    return markdown_table(head, lines)


def passkey_table(frame: pd.DataFrame) -> str:
    pk = frame[frame.metric == "passkey"]
    if pk.empty:
        return ""
    acc = pk.pivot_table(index="label", columns="context", values="value")
    tok = pk.pivot_table(index="label", columns="context", values="token_accuracy")
    acc, tok = acc.reindex(_order(acc.index)), tok.reindex(_order(tok.index))
    head = ["method"] + [_ctx(c) for c in acc.columns]
    cells = [
        [label] + [f"{acc.loc[label, c]:.2f} ({tok.loc[label, c]:.2f})" for c in acc.columns] for label in acc.index
    ]
    return markdown_table(head, cells)


def training_table(frame: pd.DataFrame) -> str:
    t = frame[frame.method != "none"].drop_duplicates("label").set_index("label")
    t = t.reindex([m for m in _order(t.index)])
    lines = []
    for label, r in t.iterrows():
        peak = "" if pd.isna(r.get("train_peak_gib")) else f"{r['train_peak_gib']:.2f}"
        lines.append([label, f"{r['final_loss']:.4f}", f"{r['train_seconds']:.1f}", peak])
    return markdown_table(["method", "final train loss", "train time (s)", "train peak (GiB)"], lines)


def paper_table() -> str:
    lines = []
    for p in goals().paper_perplexity:
        data, ctx, lora, lemo = p.dataset, p.context, p.lora, p.lemo
        lines.append([data, f"{ctx // 1024}K", f"{lora:.2f}", f"{lemo:.2f}", f"{100 * (lemo / lora - 1):+.1f}%"])
    return markdown_table(["paper (Llama-2-7B)", "context", "LoRA", "LeMo", "delta"], lines)


def predictor_section(pred_dir: Path) -> str:
    """Predictor size, training and recall of the oracle's kept blocks (top-k and tuned thresholds)."""
    recall_csv, meta_json = pred_dir / "recall.csv", pred_dir / "predictors.json"
    if not recall_csv.exists():
        return ""
    parts = []
    if meta_json.exists():
        meta = json.loads(meta_json.read_text())
        tr = meta.get("training", {})
        curve = tr.get("loss_curve") or []
        widths = sorted({tuple(w) for layer in meta.get("layers", {}).values() for w in layer.values()})
        parts.append(
            f"Predictors: {meta['parameters'] / 1e6:.2f}M parameters for sparse layers "
            f"{meta['sparse_layers']}, trained {tr.get('steps', 0)} steps ({tr.get('tokens', 0) / 1e6:.1f}M "
            f"tokens, {tr.get('seconds', 0):.0f} s) against the oracle's block maps"
            + (f", loss {curve[0]:.4f} -> {curve[-1]:.4f}" if curve else "")
            + (
                f"; hidden widths {tuple(meta.get('initial_widths', ()))} -> "
                f"{', '.join(map(str, widths))} after elastic pruning"
                if widths
                else ""
            )
            + "."
        )
    r = pd.read_csv(recall_csv)
    lines = []
    for row in r.itertuples():
        thr = "" if pd.isna(row.threshold) else f"{row.threshold:.3f}"
        lines.append(
            [str(row.selection), str(row.layer), f"{row.recall:.3f}", f"{row.mass_recall:.3f}"]
            + [f"{row.kept_fraction:.3f}", thr]
        )
    head = ["selection", "layer", "recall", "block-score-mass recall", "kept fraction", "threshold"]
    where = ""
    if "gpu" in r:
        where = (
            f" Evaluated on {r.gpu.iloc[0]} ({r.dtype.iloc[0]}), "
            f"{int(r.batches.iloc[0]) * int(r.batch.iloc[0])} windows of "
            f"{int(r.context.iloc[0])} tokens, commit `{str(r.git_commit.iloc[0])[:10]}`."
        )
    tuned = pred_dir / "recall.thresholds.json"
    if tuned.exists() and "tuned_on_seed" in json.loads(tuned.read_text()):
        where += (
            " Thresholds were tuned on other held-out windows than these (target recall "
            f"{json.loads(tuned.read_text())['target_recall']:g})."
        )
    parts += [
        f"**Predictor recall** of the oracle's kept blocks on held-out windows (paper: 95.1%).{where}",
        markdown_table(head, lines),
    ]
    return "\n\n".join(parts)


def _scored_tokens(frame: pd.DataFrame) -> str:
    """Whether every context scored the same tokens (it does since window starts are left out at all)."""
    if "tokens" not in frame:
        return ""
    counts = frame[frame.metric == "perplexity"].groupby("context")["tokens"].max()
    if counts.nunique() == 1:
        return f"the same {int(counts.iloc[0])} scored tokens at every context."
    return (
        f"scored tokens {int(counts.min())} to {int(counts.max())} (longer windows score the starts of "
        "shorter ones; runs before the same-token fix)."
    )


def summary(frame: pd.DataFrame, pretrain: dict | None, pred_dir: Path | None = None) -> str:
    parts = []
    if pretrain:
        cfg = pretrain["config"]
        corpus = pretrain.get("corpus", {})
        parts.append(
            f"Model: Llama architecture, {pretrain['parameters'] / 1e6:.1f}M parameters ({cfg['num_layers']} layers, "
            f"hidden {cfg['hidden_size']}, {cfg['num_heads']} heads), pretrained at {cfg['context']} tokens for "
            f"{pretrain['steps_done']} steps ({pretrain['tokens_seen'] / 1e6:.0f}M tokens, "
            f"{pretrain['epochs']:.1f} epochs of "
            f"{corpus.get('train', {}).get('tokens', 0) / 1e6:.1f}M train tokens) in "
            f"{pretrain['seconds']:.0f} s; held-out loss {pretrain['final_heldout_loss']:.3f}. Weights sha256 "
            f"`{pretrain['weights_sha256'][:16]}`."
        )
    ft = frame[frame.method != "none"]
    if not ft.empty:
        cfg = json.loads(ft.finetune_config.iloc[0])
        parts.append(
            f"Fine-tuning: RoPE linear x{cfg['rope_factor']:g} to {cfg['context']} tokens, {cfg['steps']} steps of "
            f"{cfg['batch_size']} x {cfg['context']} tokens, lr {cfg['lr']:g}, seed {cfg['seed']}, "
            + (
                "fp32 weights with bf16 autocast"
                if cfg.get("master_weights") == "float32"
                else "bf16 weights without an fp32 master copy"
            )
            + ", same data "
            "order for every method. Evaluation: dense model (adapters on), "
            f"{int(frame[frame.metric == 'perplexity'].documents.iloc[0])} held-out documents x "
            f"{cfg['eval_tokens_per_doc']} tokens at every context; " + _scored_tokens(frame)
        )
    prov = frame.iloc[0]
    parts.append(
        f"Measured on {prov.get('gpu', '?')}, torch {prov.get('torch', '?')}, transformers "
        f"{prov.get('transformers', '?')}, commit `{str(prov.get('git_commit', '?'))[:10]}`."
    )
    parts += [
        "**Perplexity** (relative to dense LoRA at the same context):",
        perplexity_table(frame),
        "**Passkey retrieval** (exact answers; per-token accuracy in brackets):",
        passkey_table(frame),
        "**Training**:",
        training_table(frame),
        "**The paper's reference deltas**:",
        paper_table(),
    ]
    if pred_dir is not None:
        parts.append(predictor_section(pred_dir))
    return "\n\n".join(p for p in parts if p)


def figures(frame: pd.DataFrame, runs: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    ppl = frame[frame.metric == "perplexity"]
    fig, (ax, rel) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = ppl[ppl.label == "lora"].set_index("context").value
    for label in _order(ppl.label):
        d = ppl[ppl.label == label].sort_values("context")
        style = dict(
            marker="o",
            color=method_color(label),
            label=label,
            linestyle="--" if label.startswith("pretrained") else "-",
        )
        ax.plot(d.context, d.value, **style)
        if not label.startswith("pretrained") and label != "lora" and len(base):
            rel.plot(d.context, 100 * (d.value.values / base.reindex(d.context).values - 1), **style)
    ax.set_yscale("log")
    ax.set_title("held-out perplexity after context extension", fontsize=10)
    rel.axhline(0, color="black", linewidth=0.8)
    rel.axhspan(-2, 2, color="green", alpha=0.1, label="within 2% of LoRA")
    rel.set_title("perplexity relative to dense LoRA at the same context (%)", fontsize=10)
    for a in (ax, rel):
        a.set_xscale("log", base=2)
        a.set_xlabel("evaluation context (tokens)")
    ax.set_ylabel("perplexity")
    rel.set_ylabel("perplexity / LoRA - 1 (%)")
    rel.legend(fontsize=7, ncol=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "perplexity.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    losses = sorted(Path(runs).glob("*/loss.csv"))
    if losses:
        fig, ax = plt.subplots(figsize=(6, 4))
        for path in sorted(losses, key=lambda p: _order([q.parent.name for q in losses]).index(p.parent.name)):
            d = pd.read_csv(path)
            label = re.sub(r"\.s\d+$", "", path.parent.name)
            ax.plot(d.step, d.loss.rolling(10, min_periods=1).mean(), label=path.parent.name, color=method_color(label))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (10-step mean)")
        ax.set_title("training loss (10-step mean) during context-extension fine-tuning", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "finetune_loss.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    log = Path(runs) / "pretrain" / "pretrain_log.csv"
    if log.exists():
        d = pd.read_csv(log)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(d.tokens / 1e6, d.train_loss, label="train")
        h = d.dropna(subset=["heldout_loss"])
        ax.plot(h.tokens / 1e6, h.heldout_loss, marker="o", label="held-out")
        ax.set_xlabel("tokens seen (M)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("training and held-out loss (nats/token) during pretraining", fontsize=10)
        ax.legend()
        fig.tight_layout()
        paths.append(out / "pretrain_loss.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def recall_figure(recall_csv: Path, out: Path) -> Path | None:
    """Per-layer recall of the oracle's kept blocks: top-k vs tuned thresholds (with the kept fraction)."""
    if not recall_csv.exists():
        return None
    r = pd.read_csv(recall_csv)
    r = r[r.layer.astype(str) != "all"]
    fig, ax = plt.subplots(figsize=(6, 4))
    layers = sorted(r.layer.astype(int).unique())
    for k, (sel, g) in enumerate(r.groupby("selection")):
        g = g.assign(layer=g.layer.astype(int)).set_index("layer").reindex(layers)
        xs = [x + 0.38 * k for x in range(len(layers))]
        bars = ax.bar(xs, g.recall, width=0.36, label=f"{sel}")
        for b, kept in zip(bars, g.kept_fraction):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.005, f"kept {kept:.2f}", ha="center", fontsize=6)
    ax.axhline(0.951, color="gray", linestyle=":", label="paper 95.1%")
    ax.set_xticks([x + 0.19 for x in range(len(layers))], [str(x) for x in layers])
    ax.set_xlabel("sparse layer")
    ax.set_ylabel("recall of oracle-kept blocks")
    ax.set_ylim(0.5, 1.02)
    ax.set_title("recall of oracle-kept blocks, trained predictors (held-out)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = out / "predictor_recall.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    runs: Path, out: Path, figure_dir: Path, readme: Path | None = None, name: str = "small"
) -> list[Path]:
    frame = collect(runs)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "accuracy.csv", index=False)
    pre = Path(runs) / "pretrain" / "pretrain.json"
    text = summary(frame, json.loads(pre.read_text()) if pre.exists() else None, out / "predictors")
    (out / "summary.md").write_text(text + "\n")
    paths = [out / "accuracy.csv", out / "summary.md"] + figures(frame, runs, figure_dir)
    recall = recall_figure(out / "predictors" / "recall.csv", figure_dir)
    paths += [recall] if recall else []
    if readme:
        update_readme(readme, f"accuracy-{name}", text)
    return paths
