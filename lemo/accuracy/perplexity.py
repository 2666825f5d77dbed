"""Perplexity of held-out long documents at a given context length.

Every context length scores the same tokens: the first `tokens_per_doc` tokens of each held-out
document that has at least that many, cut into non-overlapping windows of `context` tokens (each
window predicts its tokens 2..context from the ones before it, as in LongLoRA's evaluation). Longer
contexts then differ only in how much history each prediction sees.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def windows(docs: list[np.ndarray], context: int, tokens_per_doc: int) -> torch.Tensor:
    """(W, context) windows covering the first `tokens_per_doc` tokens of each long-enough document."""
    if tokens_per_doc % context:
        raise ValueError(f"tokens_per_doc ({tokens_per_doc}) must be a multiple of the context ({context})")
    rows = [torch.from_numpy(np.asarray(d[:tokens_per_doc], dtype=np.int64)).view(-1, context)
            for d in docs if len(d) >= tokens_per_doc]
    if not rows:
        raise ValueError(f"no document has {tokens_per_doc} tokens; lower tokens_per_doc or use longer documents")
    return torch.cat(rows)


@torch.no_grad()
def perplexity(model, docs: list[np.ndarray], context: int, tokens_per_doc: int, batch_size: int = 1) -> dict:
    """{'nll': mean next-token NLL (nats), 'ppl': exp(nll), 'tokens': predictions, 'windows': W}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = windows(docs, context, tokens_per_doc)
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids = data[i:i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count, "windows": len(data)}
