"""Training layer predictors against the oracle's block maps of a frozen base model.

Per step, one batch of token ids goes through the frozen decoder (no LM head, stopped after the last
sparse layer). At each sparse layer a forward pre-hook takes the layer's input hidden state, computes
the oracle block map from the layer's real post-RoPE q, k (`block_scores` / `block_scores_torch` with
return_map=True: (B, nb, nb), never L x L) and the predicted map from attn_norm(hidden), and
backpropagates that layer's loss at once (nothing is kept across layers). Then one AdamW step.

Loss: SmoothL1 (or MSE) over the allowed tiles (causal, same document) of each map. With
`normalize=True` (default) the predicted and the target map of each sequence are both divided by the
target's mean over its allowed tiles (a constant, no gradient), so every sequence and layer counts the
same whatever the scale of its attention scores; selection is scale-free per sequence anyway.

Elastic size: with `prune_every=N`, the zero frequency of every ReLU unit is counted during training
and every N steps the `prune_fraction` most-often-zero units of each hidden layer are removed
(`elastic.prune_set`), down to `min_width`.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn.functional as F

from .blocks import allowed_tiles
from .collect import doc_ids_of, oracle_block_map, run_layers
from .elastic import prune_set, rebuild_optimizer
from .store import PredictorSet, build_predictors

LOSSES = ("smooth_l1", "mse")


def map_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    allowed: torch.Tensor,
    kind: str = "smooth_l1",
    normalize: bool = True,
    beta: float = 1.0,
) -> torch.Tensor:
    """Mean elementwise loss over allowed tiles; see the module docstring for `normalize`."""
    allowed = allowed.expand_as(target)
    if normalize:
        n = allowed.sum(dim=(1, 2)).clamp(min=1)
        scale = ((target * allowed).sum(dim=(1, 2)) / n).clamp(min=1e-8)[:, None, None]
        pred, target = pred / scale, target / scale
    if kind == "smooth_l1":
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    elif kind == "mse":
        err = F.mse_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    return err[allowed].mean()


def train_predictors(
    model,
    batches: Iterable,
    *,
    predictors: PredictorSet | None = None,
    sparse_layers: list[int] | None = None,
    block_size: int = 64,
    widths=(128, 64),
    per_head: bool = False,
    steps: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    loss: str = "smooth_l1",
    normalize: bool = True,
    grad_clip: float | None = 1.0,
    prune_every: int = 0,
    prune_fraction: float = 0.1,
    min_width: int = 8,
    min_zero_freq: float = 0.0,
    kernels: str = "auto",
    seed: int = 0,
    log=None,
    progress: bool = False,
) -> PredictorSet:
    """Train (or, with steps=0, just initialise) predictors for `model`'s sparse layers.

    `batches`: an iterable of (B, L) LongTensors (or dicts with input_ids and optional attention_mask /
    position_ids); one batch per step, for `steps` steps or until it runs out (steps=None).
    Returns the fp32 PredictorSet, eval mode, with `meta["training"]` filled in. `log`: a callable
    given one line per step (and per pruning); `progress=True` draws a tqdm bar on stderr (tqdm is
    imported only then).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if predictors is None:
        predictors = build_predictors(model, sparse_layers, block_size, tuple(widths), per_head, seed)
    predictors.float().train()
    layers, bs = predictors.layers, predictors.block_size
    optimizer = torch.optim.AdamW(predictors.parameters(), lr=lr, weight_decay=weight_decay)
    curve, layer_curve, prunes, tokens = [], {i: [] for i in layers}, [], 0
    start = time.perf_counter()

    def step_layer(i, parts, hidden, position_embeddings, layout):
        target, _ = oracle_block_map(parts, hidden, position_embeddings, layout, bs, kernels)
        normed = parts.attn_norm(hidden)
        docs = doc_ids_of(layout)
        allowed = allowed_tiles(hidden.shape[1], bs, hidden.device, docs)
        with torch.enable_grad():
            value = map_loss(predictors[i].block_map(normed, docs, allowed), target, allowed, loss, normalize)
            value.backward()
        return float(value)

    step, batch_iter = 0, iter(batches)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="train predictors", unit="step", dynamic_ncols=True)
    while steps is None or step < steps:
        try:
            batch = next(batch_iter)
        except StopIteration:
            break
        predictors.set_tracking(prune_every > 0)
        optimizer.zero_grad(set_to_none=True)
        losses = run_layers(model, batch, layers, step_layer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(predictors.parameters(), grad_clip)
        optimizer.step()
        step += 1
        tokens += int((batch["input_ids"] if isinstance(batch, dict) else batch).numel())
        curve.append(sum(losses.values()) / len(losses))
        for i, v in losses.items():
            layer_curve[i].append(v)
        if bar is not None:
            bar.set_postfix(loss=f"{curve[-1]:.4f}", refresh=False)
            bar.update()
        if log is not None:
            log(f"step {step}: loss {curve[-1]:.4f}")
        if prune_every and step % prune_every == 0 and (steps is None or step < steps):
            changes = prune_set(predictors, prune_fraction, min_width, min_zero_freq)
            if changes:
                optimizer = rebuild_optimizer(optimizer, predictors.parameters(), changes)
            prunes.append(
                {
                    "step": step,
                    "parameters": predictors.parameter_count(),
                    "widths": {str(i): w for i, w in predictors.widths().items()},
                }
            )
            if log is not None:
                log(f"step {step}: pruned to {predictors.parameter_count()} parameters")
    if bar is not None:
        bar.close()
    predictors.set_tracking(False)
    predictors.eval()
    predictors.meta["training"] = {
        "steps": step,
        "tokens": tokens,
        "lr": lr,
        "weight_decay": weight_decay,
        "loss": loss,
        "normalize": normalize,
        "grad_clip": grad_clip,
        "prune_every": prune_every,
        "prune_fraction": prune_fraction,
        "min_width": min_width,
        "seconds": round(time.perf_counter() - start, 3),
        "loss_curve": curve,
        "layer_loss_curve": {str(i): v for i, v in layer_curve.items()},
        "prune_events": prunes,
    }
    return predictors
