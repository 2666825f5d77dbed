"""Microbenchmark: block-score kernel (Triton) vs the segmented torch path, bf16, Llama shapes.

Writes one CSV row per (implementation, context): median time (triton.testing.do_bench), achieved
TFLOP/s on the causal tiles actually computed, and peak memory above the inputs.
Usage: python workflows/scripts/bench_block_scores.py OUT.csv [CONTEXT ...]
"""

import sys

import torch
import triton

from lemo.bench.provenance import provenance
from lemo.bench.results import write_rows
from lemo.kernels.block_scores import block_scores, block_scores_torch


def main(out, contexts):
    rows, prov = [], provenance(torch.device("cuda"))
    for length in contexts:
        for hq, hkv in [(32, 32), (32, 8)]:
            q = torch.randn(1, hq, length, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hkv, length, 128, device="cuda", dtype=torch.bfloat16)
            nb = -(-length // 64)
            flops = nb * (nb + 1) / 2 * 64 * 64 * 128 * 2 * hq  # causal tiles x tile matmul x heads
            for name, fn in [("triton", block_scores), ("torch", block_scores_torch)]:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                ms = triton.testing.do_bench(
                    lambda: fn(q, k, return_map=False), warmup=50, rep=300, return_mode="median"
                )
                extra = (torch.cuda.max_memory_allocated() - base) / 2**20
                rows.append(
                    dict(
                        kernel="block_scores",
                        impl=name,
                        context=length,
                        hq=hq,
                        hkv=hkv,
                        ms=ms,
                        tflops=flops / ms / 1e9,
                        extra_mib=extra,
                        gpu=prov["gpu"],
                        driver=prov["driver"],
                        torch=prov["torch"],
                        triton=prov["triton"],
                        git_commit=prov["git_commit"],
                    )
                )
                print(
                    f"{name:7s} L={length:6d} hq={hq} hkv={hkv}: {ms:8.2f} ms {rows[-1]['tflops']:6.1f} TFLOP/s "
                    f"+{extra:.0f} MiB",
                    flush=True,
                )
    write_rows(out, rows)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2:]] or [8192, 16384, 32768, 65536])
