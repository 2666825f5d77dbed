"""`lemo dist-report`: multi-GPU records -> CSV and a markdown scaling table.

Scaling efficiency (ddp / fsdp2) = tokens/s on N GPUs / (N x tokens/s on 1 GPU), same model, method and
per-GPU context. For sp the table gives the longest context that trained on N GPUs and its ratio to 1 GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def frame(files: list[Path]) -> pd.DataFrame:
    rows = []
    for f in files:
        rec = json.loads(Path(f).read_text())
        p, m = rec["point"], rec["metrics"]
        rows.append(
            {
                "id": rec["id"],
                "parallelism": rec["parallelism"],
                "world_size": rec["world_size"],
                "model": p["model"],
                "method": p["method"],
                "context": p["context"],
                "gradient_checkpointing": p["gradient_checkpointing"],
                "status": rec["status"],
                "reason": rec.get("reason"),
                "step_s": m.get("step_s"),
                "tokens_per_s": m.get("tokens_per_s"),
                "peak_allocated_gib_max": m.get("peak_allocated_gib_max"),
                "peak_reserved_gib_max": m.get("peak_reserved_gib_max"),
                "gpu": rec["provenance"].get("gpu"),
                "git_commit": rec["provenance"].get("git_commit"),
            }
        )
    return pd.DataFrame(rows).sort_values(["parallelism", "model", "method", "context", "world_size"])


def scaling(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[(df.status == "ok") & df.parallelism.isin(["ddp", "fsdp2"])].copy()
    keys = ["parallelism", "model", "method", "context"]
    one = ok[ok.world_size == 1].set_index(keys)["tokens_per_s"].rename("tokens_per_s_1gpu")
    ok = ok.join(one, on=keys)
    ok["efficiency"] = ok.tokens_per_s / (ok.world_size * ok.tokens_per_s_1gpu)
    return ok[keys + ["world_size", "tokens_per_s", "efficiency", "peak_allocated_gib_max"]]


def max_context(df: pd.DataFrame) -> pd.DataFrame:
    sp = df[df.parallelism == "sp"]
    best = sp[sp.status == "ok"].groupby(["model", "method", "world_size"]).context.max().rename("max_context")
    best = best.reset_index()
    one = best[best.world_size == 1].set_index(["model", "method"]).max_context.rename("max_context_1gpu")
    best = best.join(one, on=["model", "method"])
    best["vs_1gpu"] = best.max_context / best.max_context_1gpu
    return best


def markdown(df: pd.DataFrame) -> str:
    parts = [
        "## Data parallel scaling\n",
        scaling(df).to_markdown(index=False, floatfmt=".3f"),
        "\n\n## Sequence parallel: longest context that trained\n",
        max_context(df).to_markdown(index=False),
        "\n",
    ]
    return "\n".join(parts)


def run(args) -> int:
    files = [f for d in args.records for f in sorted(Path(d).rglob("*.json"))]
    if not files:
        raise SystemExit(f"no records under {args.records}")
    df = frame(files)
    df.to_csv(args.out, index=False)
    if args.md:
        Path(args.md).write_text(markdown(df))
    print(f"{len(files)} records -> {args.out}")
    return 0
