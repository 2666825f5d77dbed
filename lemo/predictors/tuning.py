"""Per-layer selection thresholds for predictor scores (the paper's threshold search).

Threshold selection keeps a block when its predicted score >= t * (the sequence's mean predicted
score), t per layer (`select_blocks(..., threshold=t)`, `LeMoConfig(selection="threshold",
threshold={layer: t})`). Objective, per layer, on the tuning data: reach `target_recall` of the
oracle's top-k (keep_ratio) blocks (metric "blocks") or of their attention mass (metric "mass")
while keeping as few blocks as possible. Minimised as

    F(t) = kept_fraction(t) + penalty * max(0, target_recall - recall(t))

in u = ln t, starting at t = 1 (the layer's mean predicted score), by `iters` steps
u <- u - lr_k * g with the central finite difference g = (F(e^(u+d)) - F(e^(u-d))) / 2d
(d doubled, up to 4 times, while g is 0 on a flat stretch; step clipped to +-max_step;
lr_k = lr / (1 + k / 4)). The result is the best feasible iterate (recall >= target, fewest kept
blocks); when no iterate is feasible, t is lowered by factors of 2 until one is, and t = 0 (keep
every valid block) is the last resort, so the target is always met on the tuning data.
"""

from __future__ import annotations

import math

from .evaluate import _metrics, selection_counts

METRICS = ("blocks", "mass")


def tune_thresholds(
    scores: dict[int, list],
    keep_ratio: float = 0.4,
    target_recall: float = 0.9,
    metric: str = "blocks",
    iters: int = 20,
    lr: float = 0.5,
    delta: float = 0.1,
    penalty: float = 10.0,
    max_step: float = 0.5,
) -> tuple[dict[int, float], list[dict]]:
    """({layer: threshold}, rows) from `evaluate.collect_scores` output."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    key = "recall" if metric == "blocks" else "mass_recall"
    thresholds, rows = {}, []
    for layer, entries in scores.items():
        cache = {}

        def measure(t):
            if t not in cache:
                cache[t] = _metrics(selection_counts(entries, keep_ratio, t))
            return cache[t]

        def objective(u):
            m = measure(math.exp(u))
            return m["kept_fraction"] + penalty * max(0.0, target_recall - m[key])

        def better(t, best):
            m = measure(t)
            if m[key] < target_recall:
                return False
            return (
                best is None
                or m["kept_fraction"] < measure(best)["kept_fraction"]
                or (m["kept_fraction"] == measure(best)["kept_fraction"] and t > best)
            )

        u, best = 0.0, None
        for k in range(iters):
            if better(math.exp(u), best):
                best = math.exp(u)
            d, g = delta, 0.0
            for _ in range(5):
                g = (objective(u + d) - objective(u - d)) / (2 * d)
                if g != 0.0:
                    break
                d *= 2
            if g == 0.0:
                break
            u -= max(-max_step, min(max_step, lr / (1 + k / 4) * g))
        if better(math.exp(u), best):
            best = math.exp(u)
        t = best
        while t is None:  # nothing feasible seen: lower the threshold until the target is met
            u -= math.log(2)
            if better(math.exp(u), None):
                t = math.exp(u)
            elif u < -30:
                t = 0.0
        m = measure(t)
        thresholds[layer] = float(t)
        rows.append(
            dict(
                layer=layer,
                threshold=float(t),
                metric=metric,
                target_recall=target_recall,
                recall=m["recall"],
                mass_recall=m["mass_recall"],
                kept_fraction=m["kept_fraction"],
                feasible=m[key] >= target_recall,
                evaluations=len(cache),
            )
        )
    return thresholds, rows
