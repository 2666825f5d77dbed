"""Passkey retrieval (Mohtashami & Jaggi 2023, as LongLoRA evaluates it): a number hidden at a chosen
depth of repetitive filler text; the model must produce it after "What is the pass key?". And a
multi-key variant (key-value retrieval): several "The value of key K is V." lines spread through the
filler; the model must give the value of one of them, so it must tell the lines apart.

Scored teacher-forced: the answer counts when the model's greedy (argmax) prediction is right at every
answer token, which is exactly when greedy decoding would write the key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..bench.progress import progress

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeySample:
    ids: list[int]  # prompt + answer tokens
    answer_start: int  # index of the first answer token in ids
    key: int
    key_start: int  # token holding the key line's first character
    key_end: int  # token holding the first character after the key line


def _encode(tokenizer, text: str):
    """The text's tokens as one piece (no BOS/EOS): pieces encoded apart would join differently."""
    return tokenizer.encode(text, add_special_tokens=False)


def make_sample(tokenizer, length: int, depth: float, key: int) -> PasskeySample:
    """At most `length` tokens with the key line after `depth` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key_line, answer = KEY_LINE.format(key=key), f" {key}"
    per_filler = (len(_encode(tokenizer, FILLER * 11).ids) - len(_encode(tokenizer, FILLER).ids)) / 10
    fixed = len(_encode(tokenizer, INTRO + key_line + QUESTION + answer).ids)
    n_fill = int((length - fixed) // per_filler)
    if n_fill < 1:
        raise ValueError(f"length {length} is too short for a passkey prompt")
    while True:
        before = round(n_fill * depth)
        prompt = INTRO + FILLER * before + key_line + FILLER * (n_fill - before) + QUESTION
        full = _encode(tokenizer, prompt + answer)
        if len(full.ids) <= length or n_fill == 1:
            break
        n_fill -= 1
    prompt_ids = _encode(tokenizer, prompt).ids
    answer_start = len(prompt_ids)
    if full.ids[:answer_start] != prompt_ids:
        raise ValueError(
            "this tokenizer merges the answer into the question's last token; passkey scoring "
            "needs the answer to start a new token"
        )
    key_char = len(INTRO + FILLER * before)
    return PasskeySample(
        list(full.ids), answer_start, key, full.char_to_token(key_char), full.char_to_token(key_char + len(key_line))
    )


KV_LINE = "The value of key {key} is {value}. "
KV_QUESTION = "\nWhat is the value of key {key}? The value of key {key} is"


def make_kv_sample(tokenizer, length: int, pairs: int, target: int, rng: random.Random) -> PasskeySample:
    """At most `length` tokens: `pairs` key-value lines evenly spread through the filler; the question
    asks for the value of pair number `target` (0-based, in order of appearance)."""
    keys = rng.sample(range(10000, 99999), pairs)
    values = [rng.randint(10000, 99999) for _ in keys]
    lines = [KV_LINE.format(key=k, value=v) for k, v in zip(keys, values)]
    question, answer = KV_QUESTION.format(key=keys[target]), f" {values[target]}"
    per_filler = (len(_encode(tokenizer, FILLER * 11).ids) - len(_encode(tokenizer, FILLER).ids)) / 10
    fixed = len(_encode(tokenizer, INTRO + "".join(lines) + question + answer).ids)
    n_fill = int((length - fixed) // per_filler)
    if n_fill < pairs + 1:
        raise ValueError(f"length {length} is too short for {pairs} key-value lines")
    while True:
        gaps = [n_fill * (i + 1) // (pairs + 1) - n_fill * i // (pairs + 1) for i in range(pairs + 1)]
        prompt = INTRO + "".join(FILLER * g + line for g, line in zip(gaps, lines)) + FILLER * gaps[-1] + question
        full = _encode(tokenizer, prompt + answer)
        if len(full.ids) <= length or n_fill <= pairs + 1:
            break
        n_fill -= max(1, (len(full.ids) - length) // max(1, int(per_filler)))
    prompt_ids = _encode(tokenizer, prompt).ids
    if full.ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("this tokenizer merges the answer into the question's last token")
    return PasskeySample(list(full.ids), len(prompt_ids), values[target], 0, 0)


def _score(model, sample: PasskeySample, device) -> tuple[bool, int, int]:
    """(exact, answer tokens right, answer tokens) with greedy predictions at the answer positions."""
    ids = torch.tensor([sample.ids], device=device)
    n = len(sample.ids) - sample.answer_start
    # only the logits that predict the answer: a full-length vocabulary projection is GBs at 32K
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :n]
    hits = (logits.argmax(-1) == ids[0, sample.answer_start :]).int()
    return bool(hits.all()), int(hits.sum()), hits.numel()


@torch.no_grad()
def retrieval_grid(
    model, tokenizer, task: str, lengths: list[int], depths: list[float], trials: int, seed: int = 0, pairs: int = 8
) -> list[dict]:
    """One row per (length, depth) cell with `trials` trials: exact and per-token accuracy.

    task "passkey": depth = where the key line sits; task "kv": depth = which of `pairs` key-value
    lines is asked for (0 = the first, 1 = the last)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    bar = progress(total=len(lengths) * len(depths) * trials, desc=task, unit="trial", leave=False)
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}/{task}/{length}/{depth}")
            exact = hit = total = 0
            for _ in range(trials):
                if task == "passkey":
                    s = make_sample(tokenizer, length, depth, rng.randint(10000, 99999))
                elif task == "kv":
                    s = make_kv_sample(tokenizer, length, pairs, round(depth * (pairs - 1)), rng)
                else:
                    raise ValueError(f"task must be 'passkey' or 'kv', got {task!r}")
                e, h, t = _score(model, s, device)
                exact, hit, total = exact + e, hit + h, total + t
                bar.update()
            rows.append(
                {
                    "metric": task,
                    "context": length,
                    "depth": depth,
                    "value": exact / trials,
                    "token_accuracy": hit / total,
                    "trials": trials,
                }
            )
    bar.close()
    model.train(was_training)
    return rows


@torch.no_grad()
def passkey_accuracy(model, tokenizer, length: int, trials: int = 20, seed: int = 0) -> dict:
    """Fraction of trials (depths spread over 0..1, random 5-digit keys) answered exactly."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rng = random.Random(seed)
    exact, token_hits, token_total = 0, 0, 0
    for t in progress(range(trials), desc=f"passkey @{length}", unit="trial", leave=False):
        s = make_sample(tokenizer, length, depth=t / max(1, trials - 1), key=rng.randint(10000, 99999))
        ids = torch.tensor([s.ids], device=device)
        pred = model(input_ids=ids, use_cache=False).logits[0, s.answer_start - 1 : -1].argmax(-1)
        hits = (pred == ids[0, s.answer_start :]).int()
        exact += int(hits.all())
        token_hits += int(hits.sum())
        token_total += hits.numel()
    model.train(was_training)
    return {"accuracy": exact / trials, "token_accuracy": token_hits / token_total, "trials": trials}
