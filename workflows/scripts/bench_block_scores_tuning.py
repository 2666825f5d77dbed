"""Tune the block-score kernel's launch config (R x R blocks per program, num_warps, num_stages), bf16.

For each context and head config, times block_scores(q, k, return_map=False, config=cfg) for every
config of the grid (triton.testing.do_bench, median), checks its column sums against the R=1 kernel
and writes one CSV row per config: status (ok / error / pruned), time, achieved TFLOP/s on the causal
64x64 tiles (as in bench_block_scores.py, so the extra diagonal work of larger super-tiles is not
counted), max relative error and whether it passed. Configs that fail to compile or launch are
recorded with the error's first line. To keep the run short, a context only times the configs that
passed within PRUNE x the best time at the previous (smaller) context; the others get status pruned.
Ends with the best config per (context, hq, hkv).
Usage: python workflows/scripts/bench_block_scores_tuning.py OUT.csv [CONTEXT ...]
"""

import itertools
import sys

import torch
import triton

from lemo.bench.provenance import provenance
from lemo.bench.results import write_rows
from lemo.kernels.block_scores import block_scores, default_config

D, BS = 128, 64
HEADS = [(32, 32), (32, 8)]
# The nested head loop is not software-pipelined (num_stages 2, 3 and 4 give the same PTX); the flat one is,
# so its depth is tuned. R=4 spills registers.
# 16 warps: four warpgroups share the R=2 accumulator (half the registers a thread), in the hope of more
# warps to hide latency with (Nsight Compute: one 8-warp program an SM, waiting at barriers).
GRID = [dict(R=r, num_warps=w, num_stages=3, flat=0) for r, w in itertools.product((1, 2), (4, 8))] + [
    dict(R=r, num_warps=w, num_stages=s, flat=1) for r, w, s in itertools.product((1, 2), (4, 8), (2, 3))
]
GRID += [dict(R=2, num_warps=16, num_stages=s, flat=f) for s, f in ((3, 0), (2, 1), (3, 1))]
# lookahead: the next head's product issued before this head's epilogue, so that (if Triton keeps the wgmma
# asynchronous) the tensor cores work while the accumulator is updated: a ping-pong within one program.
GRID = [dict(cfg, lookahead=0) for cfg in GRID] + [
    dict(R=r, num_warps=w, num_stages=s, flat=1, lookahead=1)
    for r, w, s in ((2, 8, 2), (2, 8, 3), (1, 4, 3), (2, 16, 2))
]
PRUNE = 2.0


def _name(cfg):
    return f"R={cfg['R']} w={cfg['num_warps']} s={cfg['num_stages']} flat={cfg['flat']} lookahead={cfg['lookahead']}"


def _measure(q, k, cfg, ref):
    """(ms, max relative error, passed) of one config; raises when it does not compile or launch."""
    col = block_scores(q, k, return_map=False, config=cfg)[1]  # compiles on first use
    scale = ref.abs().max().item()
    err = (col - ref).abs().max().item() / scale
    try:
        torch.testing.assert_close(col, ref, rtol=1e-2, atol=1e-2 * scale)
        passed = True
    except AssertionError:
        passed = False
    ms = triton.testing.do_bench(
        lambda: block_scores(q, k, return_map=False, config=cfg), warmup=25, rep=100, return_mode="median"
    )
    return ms, err, passed


def main(out, contexts):
    rows, prov = [], provenance(torch.device("cuda"))
    keep = {heads: GRID for heads in HEADS}  # configs still timed, per head config
    for length in sorted(contexts):
        for hq, hkv in HEADS:
            q = torch.randn(1, hq, length, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hkv, length, D, device="cuda", dtype=torch.bfloat16)
            nb = -(-length // BS)
            flops = nb * (nb + 1) / 2 * BS * BS * D * 2 * hq  # causal tiles x tile matmul x heads
            ref = block_scores(q, k, return_map=False, config={"R": 1})[1]
            timed = []
            for cfg in GRID:
                row = dict(kernel="block_scores", context=length, hq=hq, hkv=hkv, **cfg)
                if cfg not in keep[(hq, hkv)]:
                    row.update(status="pruned")
                else:
                    try:
                        ms, err, passed = _measure(q, k, cfg, ref)
                        row.update(status="ok", ms=ms, tflops=flops / ms / 1e9, max_rel_err=err, passed=passed)
                        timed.append((cfg, ms, passed))
                    except Exception as e:  # a config that does not compile or launch (e.g. out of resources)
                        row.update(status="error", error=(str(e).strip().splitlines() or [type(e).__name__])[0])
                row.update(
                    gpu=prov["gpu"],
                    driver=prov["driver"],
                    torch=prov["torch"],
                    triton=prov["triton"],
                    git_commit=prov["git_commit"],
                )
                rows.append(row)
                write_rows(out, rows)  # after every row: a run cut short keeps what it measured
                result = (
                    f"{row['ms']:8.3f} ms {row['tflops']:6.1f} TFLOP/s err {row['max_rel_err']:.1e} "
                    f"{'pass' if row['passed'] else 'FAIL'}"
                    if row["status"] == "ok"
                    else row["status"] + (f": {row['error']}" if "error" in row else "")
                )
                print(f"L={length:6d} hq={hq} hkv={hkv} {_name(cfg)}: {result}", flush=True)
            best = min((ms for _, ms, passed in timed if passed), default=None)
            keep[(hq, hkv)] = [c for c, ms, passed in timed if passed and ms <= PRUNE * best]
            del q, k, ref

    print("best config per (context, hq, hkv), vs the default config:", flush=True)
    for (length, hq, hkv), group in itertools.groupby(rows, key=lambda r: (r["context"], r["hq"], r["hkv"])):
        ok = [r for r in group if r["status"] == "ok" and r["passed"]]
        if not ok:
            print(f"L={length:6d} hq={hq} hkv={hkv}: no config passed", flush=True)
            continue
        best = min(ok, key=lambda r: r["ms"])
        default = next((r for r in ok if {c: r[c] for c in default_config(D)} == default_config(D)), None)
        vs = f", {default['ms'] / best['ms']:.2f}x the default's speed" if default else ""
        print(
            f"L={length:6d} hq={hq} hkv={hkv}: {_name(best)} {best['ms']:.3f} ms {best['tflops']:.1f} TFLOP/s{vs}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2:]] or [8192, 32768, 131072])
