"""Context-extension fine-tuning (what the paper evaluates), then perplexity and passkey retrieval.

The pretrained model's RoPE is scaled linearly (position interpolation) by `rope_factor`, and each
method fine-tunes it at the extended context with the same data order, steps, seed and LoRA
(r=8 on q,k,v,o): `lora`, `longlora`, `lemo` in either MLP mode, `lemo` with trained predictors.
Evaluation runs the dense model (LeMo and S2-Attn are training-time only) with the adapters on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..bench.methods import get_method
from ..bench.progress import progress
from ..bench.results import write_rows
from .corpus import batches, long_documents
from .passkey import passkey_accuracy, retrieval_grid
from .perplexity import perplexity
from .pretrain import warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    context: int = 8192
    rope_factor: float = 8.0
    batch_size: int = 8
    steps: int = 200
    lr: float = 1e-3
    warmup: int = 20
    seed: int = 0
    # Seeds for the workflow's runs (LABEL.s<seed> each; lemo finetune --seeds); empty = `seed` alone.
    seeds: list[int] = field(default_factory=list)
    # "float32": fp32 weights, bf16 autocast on CUDA (base weights a method trains, like LongLoRA's norms,
    # then take updates smaller than bf16's resolution); "model": train the weights in bf16 as loaded.
    master_weights: str = "float32"
    gradient_checkpointing: bool = False
    eval_contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    eval_tokens_per_doc: int = 16384
    eval_batch_size: int = 4
    # Evaluate on the first this many long held-out documents (0 = all of them).
    eval_docs: int = 0
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 8192])
    passkey_trials: int = 20
    # Retrieval grids (length x depth, passkey_trials per cell) for passkey and multi-key key-value
    # retrieval; empty = the single passkey row per length above.
    retrieval_depths: list[float] = field(default_factory=list)
    kv_pairs: int = 8


def _autocast(cfg: "FinetuneConfig", device):
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=cfg.master_weights == "float32" and device.type == "cuda"
    )


def load_extended(model_dir: Path, rope_factor: float, device, dtype=torch.bfloat16, attn: str = "sdpa"):
    """The checkpoint with RoPE linearly scaled by `rope_factor` (1 = as saved)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope_factor != 1.0:
        if params.get("rope_type", "default") not in ("default", "linear"):
            raise ValueError(
                f"{model_dir} uses rope_type {params.get('rope_type')!r}; linear scaling needs a default or linear RoPE"
            )
        base = float(params.get("factor", 1.0)) if params.get("rope_type") == "linear" else 1.0
        params.update(rope_type="linear", factor=base * rope_factor)
        cfg.rope_parameters = params
    cfg.use_cache = False
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=dtype, attn_implementation=attn)
    return model.to(device)


def load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: passkey needs the model's fast tokenizer (tokenizer.json)")
    return Tokenizer.from_file(str(path))


def evaluate(model, model_dir: Path, corpus_dir: Path, cfg: FinetuneConfig) -> list[dict]:
    """Perplexity at each eval context (same tokens for all) and passkey accuracy at each length."""
    docs = long_documents(corpus_dir, "heldout", cfg.eval_tokens_per_doc)
    if cfg.eval_docs:
        docs = docs[: cfg.eval_docs]
    device = next(model.parameters()).device
    with _autocast(cfg, device):
        return _evaluate(model, model_dir, docs, cfg)


def _evaluate(model, model_dir: Path, docs, cfg: FinetuneConfig) -> list[dict]:
    rows = []
    shortest = min(cfg.eval_contexts)  # its window starts are left unscored at every context
    for context in cfg.eval_contexts:
        r = perplexity(
            model, docs, context, cfg.eval_tokens_per_doc, batch_size=cfg.eval_batch_size, unscored_every=shortest
        )
        rows.append(
            {
                "metric": "perplexity",
                "context": context,
                "value": r["ppl"],
                "nll": r["nll"],
                "tokens": r["tokens"],
                "documents": len(docs),
            }
        )
    if len({r["tokens"] for r in rows}) != 1:
        raise ValueError(
            f"eval contexts {cfg.eval_contexts} scored different token counts; use contexts that are "
            "multiples of the shortest"
        )
    tok = load_tokenizer(model_dir)
    if cfg.retrieval_depths:
        for task in ("passkey", "kv"):
            # one test set for every run: the training seed does not pick the questions
            rows += retrieval_grid(
                model,
                tok,
                task,
                cfg.passkey_lengths,
                cfg.retrieval_depths,
                cfg.passkey_trials,
                seed=0,
                pairs=cfg.kv_pairs,
            )
        return rows
    for length in cfg.passkey_lengths:
        r = passkey_accuracy(model, tok, length, trials=cfg.passkey_trials, seed=cfg.seed)
        rows.append(
            {
                "metric": "passkey",
                "context": length,
                "value": r["accuracy"],
                "token_accuracy": r["token_accuracy"],
                "trials": r["trials"],
            }
        )
    return rows


def finetune(
    model_dir: Path,
    corpus_dir: Path,
    out_dir: Path,
    label: str,
    options: dict,
    cfg: FinetuneConfig,
    device: str = "cuda",
    save_trained: Path | None = None,
) -> list[dict]:
    """Fine-tune with method `options["method"]`, write loss curve + eval rows under out_dir/label (and
    the trained parameters to save_trained/label.pt)."""
    from ..bench.provenance import provenance

    if cfg.steps < 1:
        raise ValueError(f"fine-tuning needs steps >= 1, got {cfg.steps}; `lemo eval-base` evaluates without training")
    if cfg.master_weights not in ("float32", "model"):
        raise ValueError(f"master_weights must be 'float32' or 'model', got {cfg.master_weights!r}")
    device = torch.device(device)
    out = Path(out_dir) / label
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = load_extended(
        model_dir, cfg.rope_factor, device, dtype=torch.float32 if cfg.master_weights == "float32" else torch.bfloat16
    )
    method = get_method(options["method"])
    model = method.setup(model, options)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    model.train()
    history = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    bar = progress(
        batches(corpus_dir, "train", cfg.context, cfg.batch_size, cfg.steps, cfg.seed),
        total=cfg.steps,
        desc=f"finetune {label}",
        unit="step",
    )
    for step, ids in enumerate(bar):
        ids = ids.to(device)
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps)
        with _autocast(cfg, device):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": loss.item(), "seconds": time.perf_counter() - start})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", refresh=False)
        if step % 20 == 0 or step == cfg.steps - 1:
            log.info("[%s] step %d loss %.4f %.1fs", label, step + 1, history[-1]["loss"], history[-1]["seconds"])
    train_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    write_rows(out / "loss.csv", history)
    rows = evaluate(model, model_dir, corpus_dir, cfg)
    meta = {
        "label": label,
        "method": options["method"],
        "seed": cfg.seed,
        "options": json.dumps(options, sort_keys=True),
        "train_seconds": train_seconds,
        "train_peak_gib": peak,
        "final_loss": history[-1]["loss"],
        "finetune_config": json.dumps(asdict(cfg), sort_keys=True),
        "model_dir": str(model_dir),
        **{k: v for k, v in provenance(device).items() if not isinstance(v, (dict, list))},
    }
    rows = [{**meta, **r} for r in rows]
    (out / "eval.json").write_text(json.dumps(rows, indent=1, default=str))
    if save_trained is not None:
        Path(save_trained).mkdir(parents=True, exist_ok=True)
        torch.save(
            {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            Path(save_trained) / f"{label}.pt",
        )
    return rows


def evaluate_base(model_dir: Path, corpus_dir: Path, out_dir: Path, cfg: FinetuneConfig, device: str = "cuda"):
    """The pretrained model before fine-tuning: as saved, and with RoPE scaled but not fine-tuned."""
    from ..bench.provenance import provenance

    device = torch.device(device)
    rows = []
    for label, factor in (("pretrained", 1.0), ("pretrained+PI", cfg.rope_factor)):
        model = load_extended(
            model_dir, factor, device, dtype=torch.float32 if cfg.master_weights == "float32" else torch.bfloat16
        )
        meta = {
            "label": label,
            "method": "none",
            "options": json.dumps({"rope_factor": factor}),
            "finetune_config": json.dumps(asdict(cfg), sort_keys=True),
            "model_dir": str(model_dir),
            **{k: v for k, v in provenance(device).items() if not isinstance(v, (dict, list))},
        }
        rows += [{**meta, **r} for r in evaluate(model, model_dir, corpus_dir, cfg)]
        out = Path(out_dir) / label
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps([r for r in rows if r["label"] == label], indent=1, default=str))
    return rows
