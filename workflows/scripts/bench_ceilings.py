"""Measured ceilings of the GPU, for comparing kernel rows against: device-to-device copy bandwidth and
bf16 matmul throughput. Median of several timed runs (CUDA events) after warm-up, with provenance.

  copy    y.copy_(x) of a large bf16 tensor; GB/s counts bytes read + written (2 x size), the same
          convention as bench_movement.py's bytes moved
  matmul  torch.mm of two 8192 x 8192 bf16 matrices; TFLOP/s = 2 * 8192^3 / time

An OOM or other failure is recorded as a row with `status`.
Usage: python workflows/scripts/bench_ceilings.py OUT.csv
"""

import statistics
import sys

import torch

from lemo.bench.provenance import provenance
from lemo.bench.results import write_rows

WARMUP, RUNS = 5, 20


def _median_ms(fn):
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def copy_bandwidth(gib=4):
    n = gib * 2**30 // 2
    x = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    ms, best = _median_ms(lambda: y.copy_(x))
    moved = 2 * x.numel() * x.element_size()
    return dict(
        ceiling="copy_d2d", size=f"{gib} GiB bf16", ms=ms, value=moved / ms / 1e6, best=moved / best / 1e6, unit="GB/s"
    )


def matmul_throughput(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    ms, best = _median_ms(lambda: torch.mm(a, b, out=out))
    flops = 2 * n**3
    return dict(
        ceiling="matmul_bf16", size=f"{n}^3", ms=ms, value=flops / ms / 1e9, best=flops / best / 1e9, unit="TFLOP/s"
    )


def main(out_path):
    prov = provenance(torch.device("cuda"))
    keys = ("gpu", "gpu_memory_gib", "driver", "cuda", "torch", "triton", "git_commit", "git_dirty", "timestamp")
    rows = []
    for name, fn in [("copy_d2d", copy_bandwidth), ("matmul_bf16", matmul_throughput)]:
        try:
            row = {**fn(), "runs": RUNS, "status": "ok"}
        except torch.cuda.OutOfMemoryError as e:
            row = dict(ceiling=name, status=f"oom: {str(e)[:80]}")
        except Exception as e:
            row = dict(ceiling=name, status=f"error: {type(e).__name__}: {str(e)[:120]}")
        torch.cuda.empty_cache()
        row.update({k: prov.get(k) for k in keys})
        rows.append(row)
        print(
            f"{row['ceiling']:12s} {row.get('value', float('nan')):9.1f} {row.get('unit', '')} "
            f"(median of {RUNS}; best {row.get('best', float('nan')):.1f}) [{row['status']}]",
            flush=True,
        )
    write_rows(out_path, rows)


if __name__ == "__main__":
    main(sys.argv[1])
