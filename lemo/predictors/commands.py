"""The CLI's `lemo train-predictors` and `lemo eval-predictors` (argument handling lives in lemo.bench.cli)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..bench.progress import progress_enabled
from ..bench.results import write_rows

log = logging.getLogger(__name__)


def load_model(model: str, context: int | None, dtype: str | None = None, seed: int = 0, rope_factor: float = 1.0):
    """A local HF checkpoint directory (RoPE scaled by `rope_factor`, as the fine-tuning loads it), or a
    registry name built with seeded random weights."""
    from ..models.registry import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype)
    if Path(model).is_dir():
        from ..accuracy.finetune import load_extended

        lm = load_extended(Path(model), rope_factor, device, dtype=dt)
    else:
        if rope_factor != 1.0:
            raise ValueError(
                f"--rope-factor applies to a checkpoint directory; registry model {model!r} takes its "
                "RoPE scaling from --context"
            )
        lm = build_model(model, context=context, device=device, dtype=dt, seed=seed)
    lm.requires_grad_(False)
    return lm.eval()


def _corpus_batches(corpus: str, split: str, context: int, batch: int, steps: int, seed: int):
    from ..accuracy.corpus import batches  # provided by the accuracy package; imported only when used

    return batches(Path(corpus), split, context, batch, steps, seed)


def train_command(args) -> int:
    from .train import train_predictors

    if args.steps > 0 and not args.corpus:
        raise SystemExit("--corpus is needed to train (use --steps 0 for an untrained predictor set)")
    lm = load_model(args.model, args.context, args.dtype, args.seed, args.rope_factor)
    data = (
        _corpus_batches(args.corpus, args.split, args.context, args.batch, args.steps, args.seed)
        if args.steps > 0
        else []
    )
    widths = tuple(int(x) for x in args.widths.split(","))
    sparse = [int(x) for x in args.sparse_layers.split(",")] if args.sparse_layers else None
    preds = train_predictors(
        lm,
        data,
        sparse_layers=sparse,
        block_size=args.block_size,
        widths=widths,
        per_head=args.per_head,
        steps=args.steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        loss=args.loss,
        prune_every=args.prune_every,
        prune_fraction=args.prune_fraction,
        min_width=args.min_width,
        kernels=args.kernels,
        seed=args.seed,
        log=log.info if args.verbose else None,
        progress=progress_enabled(),
    )
    preds.meta["source"] = {
        "model": args.model,
        "corpus": args.corpus,
        "context": args.context,
        "rope_factor": args.rope_factor,
        "batch": args.batch,
        "split": args.split,
    }
    out = preds.save(args.out)
    curve = preds.meta["training"]["loss_curve"]
    log.info(
        f"{len(preds.layers)} layer predictors, {preds.parameter_count()} parameters "
        f"({preds.parameter_bytes() / 2**20:.1f} MiB fp32), {len(curve)} steps"
        + (f", loss {curve[0]:.4f} -> {curve[-1]:.4f}" if curve else "")
        + f" -> {out}"
    )
    return 0


def eval_command(args) -> int:
    from .evaluate import collect_scores, recall_rows
    from .scorer import load_scorer
    from .tuning import tune_thresholds

    lm = load_model(args.model, args.context, args.dtype, args.seed, args.rope_factor)
    preds = load_scorer(args.predictors, lm).predictors  # identity-checked, in the model's dtype
    data = _corpus_batches(args.corpus, args.split, args.context, args.batch, args.batches, args.seed + 1)
    scores = collect_scores(lm, preds, data, kernels=args.kernels)
    rows = recall_rows(scores, args.keep_ratio)
    if args.tune_thresholds:
        # Tuned on other windows of the split than the recall is reported on (seed + 2 vs seed + 1).
        tune_data = _corpus_batches(args.corpus, args.split, args.context, args.batch, args.batches, args.seed + 2)
        tune_scores = collect_scores(lm, preds, tune_data, kernels=args.kernels)
        thresholds, tuned = tune_thresholds(tune_scores, args.keep_ratio, args.target_recall, args.metric)
        rows += recall_rows(scores, args.keep_ratio, thresholds)
        path = Path(args.thresholds_out or Path(args.out).with_suffix(".thresholds.json"))
        path.parent.mkdir(parents=True, exist_ok=True)  # written before the recall CSV beside it
        path.write_text(
            json.dumps(
                {
                    "threshold": {str(k): v for k, v in thresholds.items()},
                    "tuning_rows": tuned,
                    "keep_ratio": args.keep_ratio,
                    "target_recall": args.target_recall,
                    "metric": args.metric,
                    "tuned_on_seed": args.seed + 2,
                    "evaluated_on_seed": args.seed + 1,
                },
                indent=1,
            )
            + "\n"
        )
        log.info("thresholds -> %s", path)
    from ..bench.provenance import provenance

    prov = {k: v for k, v in provenance(next(lm.parameters()).device).items() if not isinstance(v, (dict, list))}
    rows = [
        {
            **r,
            "context": args.context,
            "batches": args.batches,
            "batch": args.batch,
            "split": args.split,
            "dtype": str(next(lm.parameters()).dtype),
            **prov,
        }
        for r in rows
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_rows(args.out, rows)
    for r in rows:
        print(
            f"layer {r['layer']!s:>4} {r['selection']:9s} recall {r['recall']:.3f} mass {r['mass_recall']:.3f} "
            f"kept {r['kept_fraction']:.3f}"
        )
    return 0
