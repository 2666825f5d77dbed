"""`lemo dist-bench`: one multi-GPU point under torchrun -> one JSON record (rank 0 writes it).

    torchrun --standalone --nproc-per-node N -m lemo dist-bench --sweep S.yaml --point ID --out R.json

Each rank builds the model from the same seed, applies the method, enables checkpointing if asked,
makes its adapters equal to rank 0's and wraps (DDP / FSDP2) or makes the layers sequence-parallel.
A step is forward + backward + AdamW on the trainable parameters; after warm-up, the timed steps give
the median step time (max over ranks), tokens/s over all ranks, and each rank's peak allocated memory
(the record keeps every rank's and the max). A rank that fails (e.g. out of memory) exits non-zero, so
torchrun stops the others; `--record-failure LOG` then writes the point's record from the log.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..bench.bench import DTYPES, is_oom, write_record
from ..bench.methods import get_method
from ..bench.provenance import provenance
from ..bench.sweep import load_sweep
from ..config import LeMoConfig
from .data_parallel import broadcast_parameters, enable_checkpointing, shard_fsdp2, wrap_ddp
from .points import DistPoint, find_point

log = logging.getLogger(__name__)

GIB = 2**30


def _setup(p: DistPoint, model):
    """The point's method; under sp, LoRA is the same Ulysses path with every block kept (dense attention
    and MLP, no scoring), so LoRA and LeMo differ only in what LeMo eliminates."""
    from lemo_baselines.lora import setup as lora_setup

    from ..apply import apply_lemo
    from .sequence import apply_sequence_parallel

    if p.parallelism != "sp":
        return get_method(p.method_name).setup(model, p.options)
    model = lora_setup(model, p.options)
    if p.method_name == "lemo":
        cfg = LeMoConfig.from_dict(p.options.get("lemo", {}))
    else:
        cfg = LeMoConfig(keep_ratio=1.0, mlp_mode="dense", efficient_norm=False, lora_norm_recompute=False)
    apply_lemo(model, cfg)
    return apply_sequence_parallel(model)


def _batch(p: DistPoint, vocab: int, rank: int, device) -> dict:
    from .sequence import shard_sequence

    seed = p.seed if p.parallelism == "sp" else p.seed + rank  # sp: one sequence; dp: one per rank
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, p.context), generator=gen).to(device)
    if p.parallelism == "sp":
        return shard_sequence(ids)
    return {"input_ids": ids, "labels": ids}


def _step(p: DistPoint, model, batch: dict, optimizer) -> float:
    from .sequence import sequence_parallel_loss, sync_gradients

    if p.parallelism == "sp":
        loss = sequence_parallel_loss(model, batch, segment=4096)
        loss.backward()
        sync_gradients(model)
    else:
        loss = model(**batch).loss
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss.detach().clone()
    dist.all_reduce(loss)  # sp: the shares sum to the sequence's loss; dp: the mean over ranks' batches
    return float(loss) / (1 if p.parallelism == "sp" else dist.get_world_size())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def measure(p: DistPoint) -> dict:
    from lemo_baselines.attention import attention_context, set_model_backend

    from ..models.registry import build_model

    rank, world = dist.get_rank(), dist.get_world_size()
    if world != p.gpus:
        raise ValueError(f"point {p.id} wants {p.gpus} processes, torchrun started {world}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if p.device == "cuda" else torch.device("cpu")
    model = build_model(p.model, context=p.context, device=device, dtype=DTYPES[p.dtype], seed=p.seed)
    vocab = model.config.vocab_size
    set_model_backend(model, p.attention)
    model = _setup(p, model)
    model.train()
    if p.gradient_checkpointing:
        enable_checkpointing(model)
    broadcast_parameters(model)  # PEFT's lora_A init is random per process
    if p.parallelism == "ddp":
        model = wrap_ddp(model, device)
    elif p.parallelism == "fsdp2":
        model = shard_fsdp2(model)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    batch = _batch(p, vocab, rank, device)
    times, loss = [], float("nan")
    with attention_context(p.attention):
        for _ in range(p.warmup):
            _step(p, model, batch, optimizer)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(p.steps):
            _sync(device)
            start = time.perf_counter()
            loss = _step(p, model, batch, optimizer)
            _sync(device)
            times.append(time.perf_counter() - start)
    mine = {
        "step_s": statistics.median(times),
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None,
    }
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    step = max(r["step_s"] for r in ranks)
    peaks = [r["peak_allocated_gib"] for r in ranks]
    return {
        "step_s": step,
        "loss": loss,
        "tokens_per_step": p.tokens_per_step,
        "tokens_per_s": p.tokens_per_step / step,
        "peak_allocated_gib_max": max(peaks) if peaks[0] is not None else None,
        "peak_reserved_gib_max": max(r["peak_reserved_gib"] for r in ranks) if peaks[0] is not None else None,
        "per_rank": ranks,
    }


def record(p: DistPoint, status: str, metrics: dict | None = None, reason: str | None = None) -> dict:
    return {
        "point": p.as_dict(),
        "id": p.id,
        "world_size": p.gpus,
        "parallelism": p.parallelism,
        "method_description": get_method(p.method_name).describe(p.options)
        + (" (sequence parallel)" if p.parallelism == "sp" else ""),
        "status": status,
        "reason": reason,
        "metrics": metrics or {},
        "provenance": {
            **provenance(torch.device(p.device)),
            "world_size": p.gpus,
            "process_group": "nccl" if p.device == "cuda" else "gloo",
        },
    }


def run(args) -> int:
    p = find_point(load_sweep(args.sweep), args.point)
    if args.record_failure:  # torchrun failed: say why, from its log
        text = Path(args.record_failure).read_text(errors="replace") if Path(args.record_failure).exists() else ""
        status = "oom" if "out of memory" in text.lower() else "failed"
        lines = [line for line in text.splitlines() if "Error" in line]
        write_record(Path(args.out), record(p, status, reason=(lines[-1] if lines else text[-500:]).strip()))
        return 0
    cuda = p.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        metrics = measure(p)
        if dist.get_rank() == 0:
            write_record(Path(args.out), record(p, "ok", metrics))
            log.info(
                "%s: %.1f tokens/s, step %.3fs, peak %s GiB",
                p.id,
                metrics["tokens_per_s"],
                metrics["step_s"],
                metrics["peak_allocated_gib_max"],
            )
    except BaseException as err:  # one rank's failure must end the launch, not leave others waiting
        log.error(
            "rank %d: %s: %s: %s",
            dist.get_rank(),
            "out of memory" if is_oom(err) else "failed",
            type(err).__name__,
            err,
        )
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
