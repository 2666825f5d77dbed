"""Nsight Compute profile of the block-score kernel in its default launch config, bf16, Llama shapes.

For each context and head config, runs this script under `ncu --set full` (one launch profiled after two
warm-up launches; --clock-control none leaves the clocks as the other benchmarks see them) and keeps, from
the report, the details page's metrics (speed of light, memory, scheduler, warp state, occupancy, launch)
and the raw warp-stall metrics (cycles a warp spends in each stall reason per issued instruction). Writes
one CSV row per (context, hq, hkv, section, metric): what lemo.bench.kernel_roofline reads to say what
bounds the kernel. Without ncu the CSV holds one row saying so.
Usage: python workflows/scripts/bench_block_scores_ncu.py OUT.csv [CONTEXT ...]
       (internally: ... --launch CONTEXT HQ HKV)
"""

import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from lemo.bench.provenance import provenance
from lemo.bench.results import write_rows
from lemo.kernels.block_scores import block_scores, default_config

D = 128
HEADS = [(32, 32), (32, 8)]
STALL = "issue_stalled_"  # smsp__average_warp..._issue_stalled_REASON.ratio: cycles per issued instruction


def launch(length: int, hq: int, hkv: int) -> None:
    q = torch.randn(1, hq, length, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, length, D, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # two to compile and warm up, the third profiled
        block_scores(q, k, return_map=False)
    torch.cuda.synchronize()


def _ncu_csv(ncu: str, report: Path, page: str) -> pd.DataFrame:
    text = subprocess.run(
        [ncu, "-i", str(report), "--page", page, "--csv"], check=True, capture_output=True, text=True
    ).stdout
    return pd.read_csv(io.StringIO(text))


def profile(ncu: str, length: int, hq: int, hkv: int, tmp: Path) -> list[dict]:
    report = tmp / f"bs_{length}_{hq}_{hkv}"
    cmd = [ncu, "--clock-control", "none", "-k", "regex:block_scores", "--launch-skip", "2", "--launch-count", "1"]
    cmd += ["--set", "full", "-f", "-o", str(report), sys.executable, "-m", "workflows.scripts.bench_block_scores_ncu"]
    cmd += ["--launch", str(length), str(hq), str(hkv)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    report = report.with_suffix(".ncu-rep")
    details = _ncu_csv(ncu, report, "details")
    rows = [
        dict(section=r["Section Name"], metric=r["Metric Name"], unit=r["Metric Unit"], value=r["Metric Value"])
        for _, r in details.iterrows()
    ]
    raw = _ncu_csv(ncu, report, "raw")  # wide: header = metric names, first row = units, second = values
    for name in raw.columns:
        if name.startswith("smsp__average") and STALL in name and name.endswith(".ratio"):
            reason = name.split(STALL, 1)[1][: -len(".ratio")]
            rows.append(dict(section="Warp stalls", metric=reason, unit="cycles/issue", value=raw[name].iloc[1]))
    return rows


def main(out, contexts):
    prov = provenance(torch.device("cuda"))
    cfg = default_config(D)
    common = dict(
        kernel="block_scores",
        R=cfg["R"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        flat=cfg["flat"],
        lookahead=cfg["lookahead"],
        gpu=prov["gpu"],
        driver=prov["driver"],
        torch=prov["torch"],
        triton=prov["triton"],
        git_commit=prov["git_commit"],
    )
    ncu = shutil.which("ncu")
    if ncu is None:
        write_rows(out, [dict(common, status="unavailable", reason="ncu (Nsight Compute) is not on the PATH")])
        print("ncu is not on the PATH: nothing profiled", flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in contexts:
            for hq, hkv in HEADS:
                got = profile(ncu, length, hq, hkv, Path(tmp))
                rows += [dict(common, status="ok", context=length, hq=hq, hkv=hkv, **r) for r in got]
                write_rows(out, rows)  # after every profile: a run cut short keeps what it measured
                print(f"L={length} hq={hq} hkv={hkv}: {len(got)} metrics", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--launch":
        launch(*(int(x) for x in sys.argv[2:5]))
    else:
        main(sys.argv[1], [int(x) for x in sys.argv[2:]] or [8192, 131072])
