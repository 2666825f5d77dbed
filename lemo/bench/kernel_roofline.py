"""The block-score kernel's launch configs against a roofline: why it stops short of the matmul ceiling.

A program of the kernel (lemo.kernels.block_scores) covers R x R blocks of BS tokens. For each KV head
it loads one key tile and, for each of the g = Hq / Hkv query heads sharing it, one query tile
(R * BS x D bf16 each), and multiplies them: relu must be applied per head before the head sum, so heads
cannot be merged into one larger matmul. FLOPs per byte loaded:

    g * 2 (R BS)^2 D / (2 R BS D (1 + g)) = g R BS / (1 + g)

(32 R for MHA, 51 R for GQA with g = 4, at BS = 64). If every tile came from HBM the kernel could reach
intensity x bandwidth; neighbouring programs share rows in L2, so it can beat that, but the tiles must
still cross the L2-to-SM path once per program. R is bounded by the fp32 (R BS)^2 accumulator in registers:
R = 2 is 64 KB; R = 4 (256 KB) is the whole register file of an SM and spills.

The roofline is an upper bound; the Nsight Compute profile (workflows/scripts/bench_block_scores_ncu.py,
`ncu_section`) shows what binds: the accumulator and the pipelined tiles leave room for one program per SM,
so latency (waiting at the barriers between a head's loads and its product, then the fp32 relu-accumulate)
is not hidden: at 8K neither DRAM nor L2 is near its peak. At 131K with one KV head per query head, L2
reuse falls and the tile loads start to bind as well (results/h200-kernels/kernels/summary.md).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

BLOCK = 64  # the bench scripts' block size


def intensity(hq: int, hkv: int, r: int, block: int = BLOCK) -> float:
    """FLOPs per byte of q and k tiles loaded by one program (module docstring)."""
    g = hq / hkv
    return g * r * block / (1 + g)


def tuning_frame(path: Path, ceilings: dict) -> pd.DataFrame:
    """The tuning CSV's measured configs with their share of the matmul ceiling and their HBM roofline."""
    d = pd.read_csv(path)
    d = d[(d.status == "ok") & d.passed.astype(bool)].copy()
    matmul = ceilings.get("matmul_bf16", (float("nan"), ""))[0]
    bandwidth = ceilings.get("copy_d2d", (float("nan"), ""))[0]  # GB/s
    d["flop_per_byte"] = [intensity(r.hq, r.hkv, r.R) for r in d.itertuples()]
    d["hbm_roofline_tflops"] = (d.flop_per_byte * bandwidth / 1000).clip(upper=matmul)
    d["of_ceiling"] = d.tflops / matmul
    return d


def default_rows(frame: pd.DataFrame, head_dim: int = 128) -> pd.DataFrame:
    """The rows of the kernel's default launch config."""
    from lemo.kernels.block_scores import default_config

    cfg = default_config(head_dim)
    same = (frame.R == cfg["R"]) & (frame.num_warps == cfg["num_warps"]) & (frame.num_stages == cfg["num_stages"])
    for key in ("flat", "lookahead"):  # runs before these options existed ran without them (0)
        if key in frame:
            same &= frame[key].fillna(0) == cfg[key]
    return frame[same]


def tuning_section(path: Path, ceilings: dict) -> str:
    frame = tuning_frame(path, ceilings)
    table = pd.DataFrame(
        {
            "context": frame.context,
            "heads (q/kv)": [f"{r.hq}/{r.hkv}" for r in frame.itertuples()],
            "R": frame.R,
            "warps": frame.num_warps,
            "stages": frame.num_stages,
            "flat": frame.flat if "flat" in frame else 0,
            "lookahead": frame.lookahead.fillna(0).astype(int) if "lookahead" in frame else 0,
            "ms": frame.ms.round(3),
            "TFLOP/s": frame.tflops.round(0),
            "% of matmul ceiling": (100 * frame.of_ceiling).round(0),
            "FLOP/byte loaded": frame.flop_per_byte.round(0),
            "HBM roofline TFLOP/s": frame.hbm_roofline_tflops.round(0),
        }
    )
    first = pd.read_csv(path).iloc[0]
    return "\n\n".join(
        [
            f"**Block-score kernel launch configs** (`{path.name}`, {first.gpu}, Triton {first.triton}, commit "
            f"`{str(first.git_commit)[:10]}`): R x R blocks per program. The kernel loads a q and a k tile per head "
            "and program (relu comes before the head sum, so heads cannot share one matmul): its arithmetic "
            "intensity is g R 64 / (1 + g) FLOP per byte (g query heads per KV head), below the HBM ridge point "
            "(matmul ceiling / copy bandwidth) at every R that fits the fp32 accumulator in registers (R = 4 "
            "spills). L2 reuse between neighbouring programs lifts it above the HBM roofline, not to the matmul "
            "ceiling (lemo.bench.kernel_roofline). flat = 1: one software-pipelined loop over query heads (a GQA "
            "key tile loaded once per query head) instead of KV heads x group; lookahead = 1: in that loop, the next "
            "head's product issued before this head's epilogue (relu, add).",
            table.to_markdown(index=False),
        ]
    )


# --------------------------------------------------------------------------- Nsight Compute profile
NCU_METRICS = {  # details-page metric -> column of the profile table
    "Duration": "duration (ms)",
    "SM Busy": "SM busy %",
    "DRAM Throughput": "DRAM % of peak",
    "L2 Cache Throughput": "L2 % of peak",
    "L2 Hit Rate": "L2 hit %",
    "Issue Slots Busy": "issue slots busy %",
    "Achieved Occupancy": "occupancy %",
    "Registers Per Thread": "registers/thread",
    "Dynamic Shared Memory Per Block": "shared KiB/block",
    "Warp Cycles Per Issued Instruction": "cycles/issue",
}


def _number(value) -> float:
    """A metric value as ncu prints it ("1,005,655"); NaN for the textual ones (e.g. a scheduling policy)."""
    try:
        return float(str(value).replace(",", ""))
    except ValueError:
        return float("nan")


# ncu picks a unit per value: scaled here to the table's (ms, KiB)
_SCALE = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0, "s": 1e3, "second": 1e3}
_SCALE |= {"byte/block": 1 / 1024, "Kbyte/block": 1000 / 1024, "Mbyte/block": 1e6 / 1024}


def _value(row) -> float:
    return _number(row.value) * _SCALE.get(str(row.unit), 1.0)


def _reason(metric: str) -> str:
    return metric.removesuffix("_per_issue_active")


def ncu_frame(path: Path) -> pd.DataFrame:
    """One row per profiled (context, hq, hkv): the NCU_METRICS columns, and the warp-stall reasons ranked by
    their share of a warp's cycles between issues ("top stalls")."""
    d = pd.read_csv(path)
    if "context" not in d or not (d.status == "ok").any():  # nothing profiled (e.g. no ncu on the machine)
        return pd.DataFrame()
    d = d[d.status == "ok"]
    rows = []
    for (context, hq, hkv), g in d.groupby(["context", "hq", "hkv"], sort=True):
        metric = {r.metric: _value(r) for r in g[g.section != "Warp stalls"].itertuples()}
        stalls = {_reason(r.metric): _number(r.value) for r in g[g.section == "Warp stalls"].itertuples()}
        total = sum(stalls.values())  # a warp's cycles per issued instruction, the issuing one ("selected") too
        top = sorted(((k, v) for k, v in stalls.items() if k != "selected"), key=lambda kv: -kv[1])[:3]
        row = {"context": int(context), "heads (q/kv)": f"{hq}/{hkv}"}
        row.update({col: metric.get(name) for name, col in NCU_METRICS.items()})
        row["top stalls (share of cycles)"] = ", ".join(f"{k} {v / total:.0%}" for k, v in top) if total else ""
        rows.append(row)
    return pd.DataFrame(rows)


def ncu_section(path: Path) -> str:
    first = pd.read_csv(path).iloc[0]
    frame = ncu_frame(path)
    if not len(frame):
        why = first.get("reason", first.status)
        return f"**Block-score kernel, Nsight Compute** (`{path.name}`): not profiled ({why})."
    return "\n\n".join(
        [
            f"**Block-score kernel, Nsight Compute** (`{path.name}`, {first.gpu}, default launch config R={first.R}, "
            f"{first.num_warps} warps, {first.num_stages} stages, commit `{str(first.git_commit)[:10]}`; "
            "workflows/scripts/bench_block_scores_ncu.py): SM busy is the tensor pipe's share of cycles here; "
            "the stalls are where a warp's cycles between two issued instructions go (ncu's warp-state reasons), "
            "as shares of those cycles.",
            frame.to_markdown(index=False),
        ]
    )


def ncu_summary(path: Path) -> str | None:
    """What bounds the kernel, in a few words, from the profile's shortest-context MHA row (else its first)."""
    frame = ncu_frame(path) if path.exists() else pd.DataFrame()
    if not len(frame):
        return None
    mha = frame[[h.split("/")[0] == h.split("/")[1] for h in frame["heads (q/kv)"]]]
    r = (mha if len(mha) else frame).iloc[0]
    return (
        f"Nsight Compute at {r.context // 1024}K {r['heads (q/kv)']}: SM busy {r['SM busy %']:.0f}%, DRAM "
        f"{r['DRAM % of peak']:.0f}% of peak, issue slots {r['issue slots busy %']:.0f}%, occupancy "
        f"{r['occupancy %']:.1f}% ({r['registers/thread']:.0f} registers/thread), top stalls "
        f"{r['top stalls (share of cycles)']}"
    )
