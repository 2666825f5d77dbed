"""Choose LeMoConfig.min_sparse_tokens by measurement: the length from which a sparse step pays off.

Below some length, scoring and row movement cost more than eliminating tokens saves, so a LeMo step is
slower than the dense one. `calibrate_min_sparse_tokens` times forward + backward of the model LeMo is
applied to, at each given length, once sparse and once with the dense fallback (min_sparse_tokens above
the length: the whole model runs as without LeMo), and returns the shortest measured length from which
the sparse step is no slower at that length and every longer one measured. Nothing is trained: gradients
are dropped after each step. Call it once before training, on the GPU that trains:

    cal = calibrate_min_sparse_tokens(model, [2048, 4096, 8192, 16384])
    lemo_config(model).min_sparse_tokens = cal.min_sparse_tokens
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch

from .models.adapters import unwrap


@dataclass
class Calibration:
    min_sparse_tokens: int  # the shortest measured length from which sparse is no slower (see module docstring)
    seconds: dict = field(default_factory=dict)  # length -> {"sparse": median s, "dense": median s}


def lemo_config(model):
    """The LeMoConfig of a model LeMo is applied to (read at every forward, so it can be changed in place)."""
    handle = getattr(unwrap(model), "_lemo", None)
    if handle is None:
        raise ValueError("LeMo is not applied to this model; call apply_lemo(model, config) first")
    return handle.config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(model, ids: torch.Tensor, warmup: int, steps: int) -> float:
    """The median step, or infinity when the step does not fit in device memory (the other mode wins)."""
    try:
        return _median_step(model, ids, warmup, steps)
    except torch.OutOfMemoryError:
        for p in model.parameters():
            p.grad = None
        if ids.device.type == "cuda":
            torch.cuda.empty_cache()
        return math.inf


def _median_step(model, ids: torch.Tensor, warmup: int, steps: int) -> float:
    times = []
    for i in range(warmup + steps):
        _sync(ids.device)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        _sync(ids.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        for p in model.parameters():
            p.grad = None
    return statistics.median(times)


def calibrate_min_sparse_tokens(
    model, lengths, *, batch_size: int = 1, warmup: int = 1, steps: int = 3, seed: int = 0
) -> Calibration:
    """Time sparse and dense steps at each length (module docstring); the model's config is left as found.
    A step that runs out of device memory counts as infinitely slow (where dense does not fit, sparse wins).
    If the sparse step is slower at the longest length, the result is one above it (dense everywhere
    measured), with a warning: measure longer lengths to find where it pays off."""
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive token counts, got {lengths!r}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    config = lemo_config(model)
    lm = unwrap(model)
    if lm._lemo.state.always_sparse:
        raise ValueError(
            "sequence-parallel LeMo has no dense fallback (min_sparse_tokens does not apply): nothing to calibrate"
        )
    device = next(lm.parameters()).device
    was_training, saved = lm.training, config.min_sparse_tokens
    gen = torch.Generator().manual_seed(seed)
    seconds = {}
    model.train()
    try:
        for n in lengths:
            ids = torch.randint(0, lm.config.vocab_size, (batch_size, n), generator=gen).to(device)
            seconds[n] = {}
            for mode, threshold in (("sparse", 0), ("dense", n + 1)):
                config.min_sparse_tokens = threshold
                seconds[n][mode] = _timed(model, ids, warmup, steps)
    finally:
        config.min_sparse_tokens = saved
        model.train(was_training)
    chosen = lengths[-1] + 1
    for n in reversed(lengths):  # the longest suffix of lengths where sparse is no slower
        if seconds[n]["sparse"] > seconds[n]["dense"]:
            break
        chosen = n
    if chosen > lengths[-1]:
        warnings.warn(
            f"LeMo's sparse step was slower than the dense one at every measured length up to {lengths[-1]}; "
            f"min_sparse_tokens={chosen} runs those dense: calibrate with longer lengths to find where it pays off",
            stacklevel=2,
        )
    return Calibration(chosen, seconds)
