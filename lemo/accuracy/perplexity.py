"""Perplexity of held-out long documents at a given context length.

The first `tokens_per_doc` tokens of each held-out document that has at least that many are cut into
non-overlapping windows of `context` tokens; each window predicts its tokens 2..context from the ones
before it (LongLoRA's evaluation). A window's first token has no prediction, so the shortest context
leaves the most tokens unscored; with `unscored_every` = the shortest context, every context skips
exactly those positions and all contexts score the same tokens, differing only in how much history
each prediction sees.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..bench.progress import progress


def windows(docs: list[np.ndarray], context: int, tokens_per_doc: int) -> torch.Tensor:
    """(W, context) windows covering the first `tokens_per_doc` tokens of each long-enough document."""
    if tokens_per_doc % context:
        raise ValueError(f"tokens_per_doc ({tokens_per_doc}) must be a multiple of the context ({context})")
    rows = [
        torch.from_numpy(np.asarray(d[:tokens_per_doc], dtype=np.int64)).view(-1, context)
        for d in docs
        if len(d) >= tokens_per_doc
    ]
    if not rows:
        raise ValueError(f"no document has {tokens_per_doc} tokens; lower tokens_per_doc or use longer documents")
    return torch.cat(rows)


@torch.no_grad()
def perplexity(
    model,
    docs: list[np.ndarray],
    context: int,
    tokens_per_doc: int,
    batch_size: int = 1,
    unscored_every: int | None = None,
) -> dict:
    """{'nll': mean next-token NLL (nats), 'ppl': exp(nll), 'tokens': predictions, 'windows': W}.

    `unscored_every` = m leaves out predictions of the tokens at positions k*m of each document (the
    window starts at context m), so that contexts that are multiples of m score the same tokens."""
    if unscored_every is not None and context % unscored_every:
        raise ValueError(f"context {context} is not a multiple of unscored_every={unscored_every}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = windows(docs, context, tokens_per_doc)
    positions = torch.arange(1, context, device=device)  # target positions within a window
    keep = (
        torch.ones(context - 1, dtype=torch.bool, device=device)
        if unscored_every is None
        else positions % unscored_every != 0
    )  # window offsets are multiples of the context, hence of m
    total, count = 0.0, 0
    for i in progress(range(0, len(data), batch_size), desc=f"perplexity @{context}", unit="batch", leave=False):
        ids = data[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (b, context - 1)
        total += nll[:, keep].sum().item()
        count += int(keep.sum()) * len(ids)
    model.train(was_training)
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count, "windows": len(data)}
