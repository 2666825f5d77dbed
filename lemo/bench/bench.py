"""Run one sweep job: build the model once, measure every (context, method) point, write JSON records.

Points run in ascending context so that an out-of-memory, recorded as a data point, ends that
method's climb (larger contexts are recorded as skipped with the reason). Every record carries the
point's full configuration and provenance and is written atomically as soon as the point is done, so
a killed job loses at most the point in flight: a rerun keeps the measured (ok or out-of-memory)
records of the same point, commit and GPU and measures the rest (`resume=False` measures everything).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from lemo_baselines.attention import attention_context, get_backend, set_model_backend, unavailable_reason

from ..models.registry import build_model, get_spec, rope_scale_factor
from .measure import saved_activation_bytes, time_steps, train_step
from .methods import calibrate, get_method
from .progress import progress
from .provenance import provenance
from .sweep import Job, Point, record_name

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; records are shared results
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def set_rope_context(model, spec, context: int) -> int:
    """Point RoPE at linear scaling ceil(context / original) (the paper's setting); returns the factor."""
    if not spec.uses_rope:
        return 1
    factor = rope_scale_factor(spec, context)
    theta = spec.fields["rope_theta"]
    params = {"rope_type": "default", "rope_theta": theta}
    if factor > 1:
        params = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    if model.config.rope_parameters != params:
        model.config.rope_parameters = params
        rotary = model.model.rotary_emb
        with torch.device(rotary.inv_freq.device):
            model.model.rotary_emb = type(rotary)(config=model.config)
    return factor


def kernel_time_breakdown(model, batch, optimizer, offload: bool = False) -> dict:
    """Device time of one step by kernel category (seconds), from the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(model, batch, optimizer, offload)
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for evt in prof.events():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        totals[classify_kernel(evt.name)] += evt.time_range.elapsed_us() / 1e6
    return {f"time_{k}_s": v for k, v in sorted(totals.items())}


def classify_kernel(name: str) -> str:
    n = name.lower()
    if "block_scores" in n:
        return "scoring"
    if any(s in n for s in ("flash", "fmha", "attention", "attn", "cudnn_generated")):
        return "attention"
    if any(s in n for s in ("gemm", "cutlass", "xmma", "nvjet", "matmul", "wgmma")):
        return "gemm"
    if any(s in n for s in ("index", "scatter", "gather")):
        return "gather_scatter"
    if any(s in n for s in ("softmax", "cross_entropy", "nll", "log_softmax")):
        return "loss"
    return "other"


def describe(p: Point) -> str:
    """The method in words; never raises (the error being recorded may be these very options)."""
    try:
        text = get_method(p.method_name).describe(p.options)
    except Exception as err:
        text = f"{p.method_name} with unusable options ({type(err).__name__}: {str(err)[:200]})"
    return text + (" + saved activations offloaded to host memory" if p.offload_activations else "")


RESUME_STATUSES = ("ok", "oom")  # measurements; errors and skips are redone
RESUME_PROVENANCE = ("git_commit", "gpu")  # a record of other code or another GPU is not this run's


class JobRunner:
    def __init__(self, job: Job, out_dir: Path, log=log.info, resume: bool = True):
        self.job = job
        self.out_dir = Path(out_dir)
        self.log = log
        self.resume = resume
        first = job.points[0]
        self.device = torch.device(first.device)
        self.dtype = DTYPES[first.dtype]
        self.provenance = provenance(self.device)

    def record(
        self, p: Point, status: str, reason: str | None = None, metrics: dict | None = None, extra: dict | None = None
    ) -> dict:
        backend = get_backend(p.attention)
        rec = {
            "point": p.as_dict(),
            "method_description": describe(p),
            "attention_label": backend.label,
            "status": status,
            "reason": reason,
            "metrics": metrics or {},
            "provenance": self.provenance,
            **(extra or {}),
        }
        write_record(self.out_dir / record_name(p), rec)
        self.log(
            f"[{self.job.id}] {p.method} ctx={p.context}: {status}"
            + (f" ({reason})" if reason else "")
            + (
                f" step={metrics['step_s']:.3f}s alloc={metrics.get('peak_allocated_gib')}GiB"
                if metrics and "step_s" in metrics
                else ""
            )
        )
        return rec

    def finished(self, p: Point) -> dict | None:
        """The record an earlier run wrote for `p` with the same configuration, commit and GPU, if any."""
        if not self.resume:
            return None
        try:
            rec = json.loads((self.out_dir / record_name(p)).read_text())
            same = rec["point"] == json.loads(json.dumps(p.as_dict())) and all(
                rec["provenance"].get(k) == self.provenance.get(k) for k in RESUME_PROVENANCE
            )
        except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: measure again
            return None
        return rec if same and rec.get("status") in RESUME_STATUSES else None

    def run(self) -> None:
        job, first = self.job, self.job.points[0]
        spec = get_spec(job.model)
        head_dim = spec.fields["hidden_size"] // spec.fields["num_attention_heads"]
        gqa = (
            spec.fields.get("num_key_value_heads", spec.fields["num_attention_heads"])
            != spec.fields["num_attention_heads"]
        )
        no_cuda = self.device.type == "cuda" and not torch.cuda.is_available()
        problems = {}  # backend -> why it cannot run here (probed once)
        runnable = []
        for p in job.points:
            if p.attention not in problems:
                problems[p.attention] = (
                    "no CUDA device on this machine; run the cpu profile"
                    if no_cuda
                    else unavailable_reason(p.attention, self.device, self.dtype, head_dim, gqa)
                )
            if problems[p.attention]:
                self.record(p, "skipped", problems[p.attention])
            elif not spec.uses_rope and p.context > spec.max_positions:
                self.record(p, "skipped", f"{job.model} has learned positions for {spec.max_positions} tokens")
            else:
                runnable.append(p)
        model = None  # built when the first point needs measuring (a resumed job may need none)
        failed_at: dict[tuple, int] = {}
        for p in progress(runnable, desc=job.id, unit="point"):  # ascending context, then method
            if (p.attention, p.method) in failed_at:
                status, at = failed_at[p.attention, p.method]
                self.record(p, "skipped", f"{'out of memory' if status == 'oom' else 'failed'} at {at} tokens")
                continue
            rec = self.finished(p)
            if rec is not None:
                self.log(
                    f"[{job.id}] {p.method} ctx={p.context}: {rec['status']} (kept: recorded by the run of "
                    f"{rec['provenance'].get('timestamp')}, same commit and GPU)"
                )
            else:
                if model is None:
                    model = build_model(
                        job.model,
                        context=max(p.context for p in runnable),
                        device=self.device,
                        dtype=self.dtype,
                        seed=first.seed,
                        attn_implementation=get_backend(runnable[0].attention).hf_implementation,
                    )
                set_model_backend(model, p.attention)
                rec = self.measure(model, spec, p)
            if rec["status"] in ("oom", "error"):
                failed_at[p.attention, p.method] = (rec["status"], p.context)
        if model is not None:
            del model
            _free(self.device)

    def measure(self, base, spec, p: Point) -> dict:
        method = get_method(p.method_name)
        factor = set_rope_context(base, spec, p.context)
        model, touched = None, {}
        try:
            model = method.setup(base, p.options)
            # Base weights a method trains (LongLoRA: embeddings, norms) are restored after teardown, so
            # every method measures the same model (a CPU copy: it must not count in this point's memory).
            touched = {
                n: t.detach().to("cpu", copy=True)
                for n, t in base.named_parameters()
                if t.requires_grad and "lora_" not in n
            }
            _set_checkpointing(model, p.gradient_checkpointing)
            model.train()
            gen = torch.Generator().manual_seed(p.seed)
            ids = torch.randint(0, base.config.vocab_size, (p.batch_size, p.context), generator=gen).to(self.device)
            batch = {"input_ids": ids, "labels": ids}
            trainable = [t for t in model.parameters() if t.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-4)
            with attention_context(p.attention):
                cal = None
                if p.method_name == "lemo" and p.options.get("calibrate"):
                    setup = (p.gradient_checkpointing, p.attention, p.batch_size, p.offload_activations)
                    try:
                        cal = calibrate(model, p.options, setup, batch_size=p.batch_size)
                    except Exception as err:  # not this point's own out-of-memory or failure
                        raise RuntimeError(f"calibrating min_sparse_tokens failed: {err}") from err
                    _free(self.device)  # the calibration's longest steps must not count in this point's memory
                stats = time_steps(model, batch, optimizer, p.warmup, p.steps, offload=p.offload_activations)
                metrics = {
                    "step_s": stats.median_s,
                    "step_s_min": min(stats.step_s),
                    "step_s_max": max(stats.step_s),
                    "steps_timed": len(stats.step_s),
                    "tokens_per_s": stats.tokens_per_s,
                    "loss": stats.loss,
                    "peak_allocated_gib": _gib(stats.peak_allocated),
                    "peak_reserved_gib": _gib(stats.peak_reserved),
                    "nvml_peak_used_gib": _gib(stats.nvml_peak_used),
                    "nvml_baseline_used_gib": _gib(stats.nvml_baseline_used),
                    "trainable_params": sum(t.numel() for t in trainable),
                }
                if p.saved_bytes and not p.gradient_checkpointing:
                    saved = saved_activation_bytes(model, batch)
                    metrics["saved_activation_gib"] = saved.total / 2**30
                if p.profile and self.device.type == "cuda":
                    try:
                        metrics.update(kernel_time_breakdown(model, batch, optimizer, p.offload_activations))
                    except Exception as err:  # a breakdown is optional; the step itself was measured
                        metrics["profile_error"] = str(err)[:200]
            extra = {"rope_factor": factor}
            if cal is not None:  # the min_sparse_tokens this run chose, and the timings it chose it from
                metrics["min_sparse_tokens"] = cal.min_sparse_tokens
                extra["calibration_s"] = {str(n): t for n, t in cal.seconds.items()}
            return self.record(p, "ok", metrics=metrics, extra=extra)
        except Exception as err:
            # error_type tells a device OOM (torch.OutOfMemoryError) from a failed pinned host allocation
            if is_oom(err):
                return self.record(
                    p,
                    "oom",
                    "out of memory",
                    metrics=_peak_metrics(self.device),
                    extra={"rope_factor": factor, "error_type": type(err).__name__},
                )
            log.error("[%s] %s ctx=%d failed", self.job.id, p.method, p.context, exc_info=True)
            return self.record(
                p,
                "error",
                f"{type(err).__name__}: {str(err)[:300]}",
                extra={"rope_factor": factor, "error_type": type(err).__name__},
            )
        finally:
            try:
                if model is not None:
                    for t in model.parameters():
                        t.grad = None
                    method.teardown(model)
            finally:
                with torch.no_grad():
                    params = dict(base.named_parameters())
                    for n, saved in touched.items():
                        params[n].copy_(saved)
                _free(self.device)


def _set_checkpointing(model, on: bool) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)
    disable = getattr(model, "activation_checkpointing_disable", None)
    if enable is None:  # transformers before the rename
        enable, disable = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable
    if on:
        try:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        except TypeError:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable()


def _gib(x):
    return None if x is None else x / 2**30


def _peak_metrics(device) -> dict:
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_gib": _gib(torch.cuda.max_memory_allocated(device)),
        "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved(device)),
    }


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
