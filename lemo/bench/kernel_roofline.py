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
    return frame[same]


def tuning_section(path: Path, ceilings: dict) -> str:
    frame = tuning_frame(path, ceilings)
    table = pd.DataFrame(
        {
            "context": frame.context,
            "heads (q/kv)": [f"{r.hq}/{r.hkv}" for r in frame.itertuples()],
            "R": frame.R,
            "warps": frame.num_warps,
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
            "ceiling (lemo.bench.kernel_roofline).",
            table.to_markdown(index=False),
        ]
    )
