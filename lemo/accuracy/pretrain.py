"""Pretraining the small Llama whose accuracy we can measure (no checkpoint can be downloaded here).

A Llama-architecture model (RMSNorm, SwiGLU, RoPE; tied embeddings to keep it small) trained from
scratch at a short context on the offline corpus: fp32 master weights, bf16 autocast on CUDA, AdamW,
linear warmup then cosine decay. The held-out loss is measured on fixed windows during training. The
checkpoint is a Hugging Face directory (bf16 safetensors in shards under 15 MB, so it can travel)
with the tokenizer beside it and `pretrain.json` saying how it was made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..bench.progress import progress
from ..bench.results import write_rows
from .corpus import load_split, sample_windows

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_layers: int = 8
    num_heads: int = 6  # head_dim 64
    context: int = 1024
    rope_theta: float = 10000.0
    batch_size: int = 64
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 250
    eval_windows: int = 64
    # Stop early (and say so in pretrain.json) if wall time runs out; the step count stays the recipe.
    max_minutes: float | None = None


def model_config(cfg: PretrainConfig, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.context,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=0,
    )


def warmup_cosine(step: int, lr: float, warmup: int, steps: int, floor: float = 0.0) -> float:
    """Linear warm-up to `lr`, then cosine decay to `floor * lr` at `steps`."""
    # Not transformers' get_cosine_with_min_lr_schedule_with_warmup: it warms up step/warmup, this (step+1)/warmup
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, cfg: PretrainConfig) -> float:
    return warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps, floor=0.1)


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int, device) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
    model.train()
    return total / len(windows)


def pretrain(corpus_dir: Path, out_dir: Path, cfg: PretrainConfig, device: str = "cuda") -> dict:
    from transformers import AutoModelForCausalLM

    from ..bench.provenance import provenance

    device = torch.device(device)
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((corpus_dir / "stats.json").read_text())["vocab_size"]
    torch.manual_seed(cfg.seed)
    hf_cfg = model_config(cfg, vocab)
    hf_cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).to(device)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    held = sample_windows(corpus_dir, "heldout", cfg.context, cfg.eval_windows, seed=12345)
    train_tokens = len(load_split(corpus_dir, "train").tokens)
    history, start, stopped_early = [], time.perf_counter(), False
    model.train()
    step = 0
    bar = progress(range(cfg.steps), desc="pretrain", unit="step")
    for step in bar:
        ids = sample_windows(corpus_dir, "train", cfg.context, cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
        ids = ids.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = step == cfg.steps - 1
        out_of_time = cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes
        if step % 25 == 0 or last or out_of_time or (step + 1) % cfg.eval_every == 0:
            row = {
                "step": step + 1,
                "tokens": (step + 1) * cfg.batch_size * cfg.context,
                "lr": lr_at(step, cfg),
                "train_loss": loss.item(),
                "heldout_loss": None,
                "seconds": time.perf_counter() - start,
            }
            if (step + 1) % cfg.eval_every == 0 or last or out_of_time:
                row["heldout_loss"] = heldout_loss(model, held, cfg.batch_size, device)
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", refresh=False)
            log.info(
                "step %5d loss %.3f heldout %s %.0fs",
                row["step"],
                row["train_loss"],
                row["heldout_loss"],
                row["seconds"],
            )
        if out_of_time and not last:
            stopped_early = True
            break
    bar.close()
    seconds = time.perf_counter() - start
    model = model.to(torch.bfloat16)
    model.config.max_position_embeddings = cfg.context
    model.save_pretrained(out_dir, max_shard_size="15MB")
    shutil.copy(corpus_dir / "tokenizer.json", out_dir / "tokenizer.json")
    write_rows(out_dir / "pretrain_log.csv", history)
    weights = hashlib.sha256()
    for path in sorted(out_dir.glob("*.safetensors")):
        weights.update(path.read_bytes())
    summary = {
        "config": asdict(cfg),
        "parameters": params,
        "steps_done": step + 1,
        "stopped_early": stopped_early,
        "tokens_seen": (step + 1) * cfg.batch_size * cfg.context,
        "train_tokens": train_tokens,
        "epochs": (step + 1) * cfg.batch_size * cfg.context / train_tokens,
        "seconds": seconds,
        "final_train_loss": history[-1]["train_loss"],
        "final_heldout_loss": history[-1]["heldout_loss"],
        "weights_sha256": weights.hexdigest(),
        "corpus": json.loads((corpus_dir / "stats.json").read_text()),
        "provenance": provenance(device),
    }
    (out_dir / "pretrain.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
