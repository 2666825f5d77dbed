"""Passkey retrieval (Mohtashami & Jaggi 2023, as LongLoRA evaluates it): a number hidden at a chosen
depth of repetitive filler text; the model must produce it after "What is the pass key?".

Scored teacher-forced: the answer counts when the model's greedy (argmax) prediction is right at every
answer token, which is exactly when greedy decoding would write the key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeySample:
    ids: list[int]  # prompt + answer tokens
    answer_start: int  # index of the first answer token in ids
    key: int
    key_start: int  # token index where the key line starts
    key_end: int  # token index one past the key line


def make_sample(tokenizer, length: int, depth: float, key: int) -> PasskeySample:
    """About `length` tokens with the key line after `depth` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    enc = lambda s: tokenizer.encode(s).ids  # noqa: E731
    intro, filler, question = enc(INTRO), enc(FILLER), enc(QUESTION)
    key_line, answer = enc(KEY_LINE.format(key=key)), enc(f" {key}")
    budget = length - len(intro) - len(key_line) - len(question) - len(answer)
    if budget < len(filler):
        raise ValueError(f"length {length} is too short for a passkey prompt")
    n_fill = budget // len(filler)
    before = round(n_fill * depth)
    ids = intro + filler * before
    key_start = len(ids)
    ids = ids + key_line
    key_end = len(ids)
    ids = ids + filler * (n_fill - before) + question
    return PasskeySample(ids + answer, len(ids), key, key_start, key_end)


@torch.no_grad()
def passkey_accuracy(model, tokenizer, length: int, trials: int = 20, seed: int = 0) -> dict:
    """Fraction of trials (depths spread over 0..1, random 5-digit keys) answered exactly."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rng = random.Random(seed)
    exact, token_hits, token_total = 0, 0, 0
    for t in range(trials):
        s = make_sample(tokenizer, length, depth=t / max(1, trials - 1), key=rng.randint(10000, 99999))
        ids = torch.tensor([s.ids], device=device)
        pred = model(input_ids=ids, use_cache=False).logits[0, s.answer_start - 1:-1].argmax(-1)
        hits = (pred == ids[0, s.answer_start:]).int()
        exact += int(hits.all())
        token_hits += int(hits.sum())
        token_total += hits.numel()
    model.train(was_training)
    return {"accuracy": exact / trials, "token_accuracy": token_hits / token_total, "trials": trials}
