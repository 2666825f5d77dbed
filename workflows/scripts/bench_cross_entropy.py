"""Microbenchmark: LM head + cross-entropy, forward + backward, Llama-2-7B head (D=4096, V=32000), bf16.

Implementations (frozen head weight, hidden requires grad; the gradient of the hidden state is computed):
  plain   -- full-length F.linear + .float() + F.cross_entropy, as Hugging Face does (an OOM is a row)
  torch   -- lemo.segment_loss.SegmentedCrossEntropy, 4096-token segments (logits recomputed in backward)
  triton  -- lemo.kernels.cross_entropy.FusedLinearCrossEntropy, 4096-token segments (gradients in forward)
  liger   -- liger-kernel's fused linear cross-entropy (its own chunk size), if importable

One CSV row per (impl, context): median forward+backward time (triton.testing.do_bench), peak memory
above the inputs (one separate run), achieved TFLOP/s of the head matmuls the path does (2*N*D*V each:
plain 2, torch 3, triton 2, liger 2), and for `triton` the time and GB/s of the in-place CE kernel alone
on one segment (bytes = two reads + one write of the bf16 logits), with provenance.
Usage: python workflows/scripts/bench_cross_entropy.py OUT.csv [CONTEXT ...]
"""

import math
import sys
import time

import torch
import torch.nn.functional as F

from lemo.bench.provenance import provenance
from lemo.bench.results import write_rows
from lemo.segment_loss import segmented_lm_loss

D, V, SEGMENT = 4096, 32000, 4096
CONTEXTS = [8192, 16384, 32768, 65536, 131072]
MATMULS = {"plain": 2, "torch": 3, "triton": 2, "liger": 2}  # frozen head: no weight-gradient matmul


def has_liger() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


def impls(segment: int = SEGMENT) -> dict:
    """name -> fn(hidden (1, N, D), head, labels (1, N)) -> gradient of the hidden state."""

    def plain(h, head, labels):
        logits = head(h).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        del logits
        return torch.autograd.grad(loss, h)[0]

    def segmented(kernel):
        def fn(h, head, labels):
            return torch.autograd.grad(segmented_lm_loss(h, head, labels, segment, kernel=kernel), h)[0]

        return fn

    out = {"plain": plain, "torch": segmented("torch"), "triton": segmented("triton")}
    if has_liger():
        out["liger"] = segmented("liger")
    return out


def make_inputs(length, d=D, v=V, device="cuda", dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    head = torch.nn.Linear(d, v, bias=False, device=device, dtype=dtype).requires_grad_(False)
    head.weight.copy_(torch.randn(v, d, device=device, dtype=dtype, generator=gen) * 0.02)
    hidden = torch.randn(1, length, d, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    labels = torch.randint(0, v, (1, length), device=device, generator=gen)
    return hidden, head, labels


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _oom_types():
    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (torch.cuda.OutOfMemoryError,)


def peak_mib(fn, device):
    """Peak memory above what is allocated before the call, for one run (None off CUDA)."""
    if torch.device(device).type != "cuda":
        fn()
        return None
    _sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    del out
    _sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def median_ms(fn, device, warmup=50, rep=300):
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    times = []
    for _ in range(3):  # CPU smoke runs only
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def ce_kernel_alone(n=SEGMENT, v=V, device="cuda", dtype=torch.bfloat16):
    """Median ms and GB/s of the in-place CE kernel on one (n, V) segment (2 reads + 1 write)."""
    from lemo.kernels.cross_entropy import cross_entropy_grad_

    z = torch.randn(n, v, device=device, dtype=dtype)
    t = torch.randint(0, v, (n,), device=device)
    scale = torch.tensor(1.0 / n, device=device)
    loss = torch.empty(n, dtype=torch.float32, device=device)
    lse = torch.empty_like(loss)
    # In place: later calls see the previous gradient as logits; same work, finite values.
    ms = median_ms(lambda: cross_entropy_grad_(z, t, scale, loss_out=loss, lse_out=lse), device)
    return ms, 3 * n * v * z.element_size() / ms / 1e6


def bench_one(name, fn, length, d, v, device, dtype):
    """One CSV row's measurements for `name` at `length`; an OOM is recorded, not raised."""
    row = dict(impl=name, context=length, status="ok", ms=math.nan, matmul_tflops=math.nan, extra_mib=math.nan)
    try:
        hidden, head, labels = make_inputs(length, d, v, device, dtype)
        run = lambda: fn(hidden, head, labels)  # noqa: E731
        row["extra_mib"] = peak_mib(run, device)  # also the warm-up (Triton compile, cuBLAS heuristics)
        row["ms"] = median_ms(run, device)
        row["matmul_tflops"] = MATMULS[name] * 2 * length * d * v / row["ms"] / 1e9
    except _oom_types() as err:
        row["status"] = "oom"
        print(f"{name} L={length}: OOM ({str(err).splitlines()[0][:120]})", flush=True)
    finally:
        hidden = head = labels = run = None  # noqa: F841
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(out, contexts, d=D, v=V, segment=SEGMENT, device="cuda", dtype=torch.bfloat16):
    prov = provenance(torch.device(device))
    meta = {k: prov[k] for k in ("gpu", "driver", "torch", "triton", "git_commit", "git_dirty")}
    try:
        import importlib.metadata

        meta["liger_kernel"] = importlib.metadata.version("liger-kernel") if has_liger() else None
    except importlib.metadata.PackageNotFoundError:
        meta["liger_kernel"] = None
    ce_ms, ce_gbps = ce_kernel_alone(min(segment, max(contexts)), v, device, dtype)
    print(f"CE kernel alone ({min(segment, max(contexts))} x {v}): {ce_ms:.3f} ms, {ce_gbps:.0f} GB/s", flush=True)
    fns = impls(segment)
    rows = []
    for length in contexts:
        for name in ["plain", "torch", "triton", "liger"]:
            if name not in fns:
                row = dict(
                    impl=name,
                    context=length,
                    status="unavailable",
                    ms=math.nan,
                    matmul_tflops=math.nan,
                    extra_mib=math.nan,
                )
            else:
                row = bench_one(name, fns[name], length, d, v, device, dtype)
            is_triton = name == "triton"
            row.update(
                kernel="head_cross_entropy",
                d=d,
                v=v,
                dtype=str(dtype).replace("torch.", ""),
                segment=segment if name in ("torch", "triton") else ("auto" if name == "liger" else length),
                matmuls=MATMULS[name],
                ce_kernel_ms=ce_ms if is_triton else math.nan,
                ce_kernel_gbps=ce_gbps if is_triton else math.nan,
                **meta,
            )
            rows.append(row)
            print(
                f"{name:6s} L={length:6d}: {row['status']:11s} {row['ms']:9.2f} ms "
                f"{row['matmul_tflops']:6.1f} TFLOP/s  "
                f"+{math.nan if row['extra_mib'] is None else row['extra_mib']:8.0f} MiB",
                flush=True,
            )
    write_rows(out, rows)
    return rows


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], [int(x) for x in sys.argv[2:]] or CONTEXTS)
