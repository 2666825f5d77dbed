"""The `lemo` command: measure sweep jobs, aggregate records, draw figures, check regressions."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _measure(args) -> int:
    from .bench import JobRunner
    from .sweep import find_job, load_sweep

    sweep = load_sweep(args.sweep)
    job = find_job(sweep, args.job)
    if args.methods:  # re-measure some methods of a job; the other points' records stay as they are
        unknown = set(args.methods) - {p.method for p in job.points}
        if unknown:
            raise SystemExit(f"methods {sorted(unknown)} are not in job {job.id}")
        job.points = [p for p in job.points if p.method in args.methods]
    JobRunner(job, Path(args.out), resume=not args.fresh).run()
    return 0


def _jobs(args) -> int:
    from .sweep import jobs, load_sweep

    for job in jobs(load_sweep(args.sweep)):
        print(job.id, len(job.points))
    return 0


def _aggregate(args) -> int:
    from .results import aggregate, record_files

    files = record_files(args.records)
    if not files:
        log.error("no records under %s", args.records)
        return 1
    frame = aggregate(files, Path(args.out))
    log.info("%d records -> %d rows in %s", len(files), len(frame), args.out)
    return 0


def _figures(args) -> int:
    from .figures import plot_all

    for path in plot_all(Path(args.csv), Path(args.out_dir), Path(args.reference) if args.reference else None):
        print(path)
    return 0


def _check(args) -> int:
    from .check import load_thresholds, read_results, run_checks
    from .sweep import expand, load_sweep

    checks, sweep = load_thresholds(args.thresholds)
    sweep = Path(args.sweep) if args.sweep else sweep
    if sweep is None:
        raise ValueError(
            f"{args.thresholds}: name the sweep it checks (`sweep: ../sweeps/NAME.yaml`, relative to "
            "the file) or pass --sweep, so that points missing from the CSV are noticed"
        )
    failures = run_checks(read_results(args.csv), checks, expand(load_sweep(sweep)))
    if failures:
        print(f"{len(failures)} failure(s) against {args.thresholds} (sweep {sweep}):", file=sys.stderr)
        for line in failures:
            print(f"  FAIL {line}", file=sys.stderr)
        return 1
    print(f"all {len(checks)} checks passed ({args.thresholds}, sweep {sweep})")
    return 0


def _report(args) -> int:
    import pandas as pd

    from .report import summary

    ref = Path(args.reference_dir) if args.reference_dir else None
    return _publish(
        args,
        summary(
            pd.read_csv(args.csv),
            paper_csv=ref / "jenga_ae_a800.csv" if ref else None,
            probe_csv=ref / "h200_lora_baseline.csv" if ref else None,
        ),
    )


def _publish(args, text: str) -> int:
    """A generated table to --out, into the README block --name, or (neither given) to stdout."""
    from .report import update_readme

    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.readme:
        update_readme(Path(args.readme), args.name, text)
    if not args.out and not args.readme:
        print(text)
    return 0


def _kernel_report(args) -> int:
    from .kernel_report import kernel_report

    for path in kernel_report([Path(p) for p in args.csvs], Path(args.out), Path(args.figures)):
        print(path)
    if args.readme:
        from .report import update_readme

        update_readme(Path(args.readme), args.name, Path(args.out).read_text().strip())
    return 0


def _targets(args) -> int:
    from .targets import targets_table

    return _publish(args, targets_table(Path(args.results)))


def _max_context(args) -> int:
    from .maxctx import run_search, searches
    from .sweep import load_sweep

    sweep = load_sweep(args.sweep)
    if args.search is None:  # list them
        for s in searches(sweep):
            print(s.id)
        return 0
    if args.out is None:
        raise SystemExit("--out is needed to run a search")
    run_search(sweep, args.search, Path(args.out))
    return 0


def _max_context_report(args) -> int:
    from .maxctx_report import figure, summary, write_csv

    files = [Path(d) / "result.json" for d in args.searches if (Path(d) / "result.json").exists()]
    if not files:
        log.error("no result.json under %s", args.searches)
        return 1
    frame = write_csv(files, Path(args.csv))
    log.info("figure -> %s", figure(frame, Path(args.figure)))
    return _publish(args, summary(frame))


def _headline(args) -> int:
    from .headline import headline

    print(headline(Path(args.results), Path(args.out)))
    return 0


def _info(args) -> int:
    import json

    import torch

    from lemo_baselines.attention import BACKENDS, unavailable_reason

    from .provenance import provenance, source_commit

    if args.source_commit:
        print(source_commit())
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(json.dumps(provenance(device), indent=1))
    for name in BACKENDS:
        print(f"{name:16s} {unavailable_reason(name, device, dtype) or 'available'}")
    return 0


def _train_predictors(args) -> int:
    from ..predictors.commands import train_command

    return train_command(args)


def _eval_predictors(args) -> int:
    from ..predictors.commands import eval_command

    return eval_command(args)


def _model_window_args(p, purpose: str) -> None:
    """The model and window options train-predictors and eval-predictors share."""
    p.add_argument("--model", required=True, help="local HF checkpoint directory or registry name (random weights)")
    p.add_argument("--context", type=int, default=4096, help=f"tokens per {purpose} window (default: 4096)")
    p.add_argument(
        "--rope-factor",
        type=float,
        default=1.0,
        help="RoPE linear scaling applied to a checkpoint (as the fine-tuning will use it)",
    )
    p.add_argument(
        "--kernels",
        choices=["auto", "triton", "torch"],
        default="auto",
        help="oracle block-score implementation (default: auto, Triton where it runs)",
    )
    p.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on CUDA, float32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    """The `lemo` command's parser, every subcommand included."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="lemo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lemo {__version__}")
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument(
        "--verbose",
        "-v",
        dest="log_level",
        action="store_const",
        const=logging.DEBUG,
        default=logging.INFO,
        help="log debug messages too (default: info and above)",
    )
    chatter.add_argument(
        "--quiet",
        "-q",
        dest="log_level",
        action="store_const",
        const=logging.WARNING,
        help="log warnings and errors only, and draw no progress bars",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("measure", help="run one sweep job and write one JSON record per point")
    p.add_argument("--sweep", required=True, help="sweep YAML (workflows/sweeps/*.yaml)")
    p.add_argument("--job", required=True, help="MODEL__ATTENTION__gc0|gc1 (see `lemo jobs`)")
    p.add_argument("--methods", nargs="+", default=None, help="only these method labels of the job")
    p.add_argument("--out", required=True, help="directory for the records")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="measure every point again (default: keep the ok/OOM records this commit wrote on this GPU)",
    )
    p.set_defaults(func=_measure)
    p = sub.add_parser("jobs", help="list the jobs of a sweep")
    p.add_argument("--sweep", required=True, help="sweep YAML whose jobs to list (id and number of points)")
    p.set_defaults(func=_jobs)
    p = sub.add_parser("aggregate", help="records -> long-format CSV")
    p.add_argument("records", nargs="+", help="record directories")
    p.add_argument("--out", required=True, help="long-format CSV to write")
    p.set_defaults(func=_aggregate)
    p = sub.add_parser("figures", help="CSV -> figures (one per model)")
    p.add_argument("csv", help="sweep CSV written by `lemo aggregate`")
    p.add_argument("--out-dir", required=True, help="directory for the figures")
    p.add_argument("--reference", default=None, help="paper artifact CSV for reference markers")
    p.set_defaults(func=_figures)
    p = sub.add_parser("check", help="fail when a ratio leaves its committed bound")
    p.add_argument("csv", help="sweep CSV written by `lemo aggregate`")
    p.add_argument(
        "--thresholds", required=True, help="thresholds YAML: the checks (metric, method, bounds) and their sweep"
    )
    p.add_argument(
        "--sweep", default=None, help="the sweep the CSV comes from (default: the thresholds file's `sweep`)"
    )
    p.set_defaults(func=_check)
    p = sub.add_parser("report", help="markdown tables from a CSV (optionally into a README block)")
    p.add_argument("csv", help="sweep CSV written by `lemo aggregate`")
    p.add_argument("--out", default=None, help="markdown file to write (default: stdout unless --readme)")
    p.add_argument("--readme", default=None, help="README to update between <!-- results:NAME --> markers")
    p.add_argument("--name", default="h200", help="NAME of the README block (default: h200)")
    p.add_argument("--reference-dir", default=None, help="directory with jenga_ae_a800.csv and h200_lora_baseline.csv")
    p.set_defaults(func=_report)
    p = sub.add_parser("kernel-report", help="kernel microbenchmark CSVs -> tables (markdown) and figures")
    p.add_argument("csvs", nargs="+", help="bench_KERNEL.py outputs (ceilings.csv gives the ceilings)")
    p.add_argument("--out", required=True, help="markdown file for the tables")
    p.add_argument("--figures", required=True, help="directory for the figures")
    p.add_argument("--readme", default=None, help="README to update between <!-- results:NAME --> markers")
    p.add_argument("--name", default="kernels", help="NAME of the README block (default: kernels)")
    p.set_defaults(func=_kernel_report)
    p = sub.add_parser("targets", help="where we stand against each project target, from committed results")
    p.add_argument("--results", default="results", help="the committed results directory (default: results)")
    p.add_argument("--out", default=None, help="markdown file to write (default: stdout unless --readme)")
    p.add_argument("--readme", default=None, help="README to update between <!-- results:NAME --> markers")
    p.add_argument("--name", default="targets", help="NAME of the README block (default: targets)")
    p.set_defaults(func=_targets)
    p = sub.add_parser(
        "max-context",
        help="longest context one training step fits, per method and memory cap "
        "(doubling, then bisection; lemo.bench.maxctx)",
    )
    p.add_argument(
        "--sweep", required=True, help="a sweep with a max_context section (workflows/sweeps/h200-maxctx.yaml)"
    )
    p.add_argument("--search", default=None, help="MODEL__ATTENTION__gcN__METHOD__CAP; without it, list the searches")
    p.add_argument("--out", default=None, help="directory for the probe records and result.json (resumes from it)")
    p.set_defaults(func=_max_context)
    p = sub.add_parser("max-context-report", help="search directories -> max_context.csv, table, bar figure")
    p.add_argument("searches", nargs="+", help="directories written by `lemo max-context`")
    p.add_argument("--csv", required=True, help="max_context.csv to write")
    p.add_argument("--figure", required=True, help="bar figure to write")
    p.add_argument("--out", default=None, help="markdown table (default: stdout)")
    p.add_argument("--readme", default=None, help="README to update between <!-- results:NAME --> markers")
    p.add_argument("--name", default="max-context", help="NAME of the README block (default: max-context)")
    p.set_defaults(func=_max_context_report)
    p = sub.add_parser(
        "headline",
        help="the headline figure from committed results: LeMo's memory and step-time "
        "ratios vs the strongest LoRA-family baseline by context, and the quality-memory "
        "frontier (lemo.bench.headline)",
    )
    p.add_argument("--results", default="results", help="the results folder (sweeps, accuracy/smollm2, reference)")
    p.add_argument("--out", default="figures/headline.png", help="PNG to write")
    p.set_defaults(func=_headline)
    from ..accuracy.cli import register as register_accuracy

    register_accuracy(sub)
    from ..distributed.cli import register as register_distributed

    register_distributed(sub)
    p = sub.add_parser("info", help="machine, versions and attention backends available here")
    p.add_argument(
        "--source-commit",
        action="store_true",
        help="print only COMMIT:TREE of this clean checkout, the value of LEMO_SOURCE_COMMIT for a copy of it",
    )
    p.set_defaults(func=_info)
    p = sub.add_parser("train-predictors", help="train per-layer block predictors against the oracle (lemo.predictors)")
    _model_window_args(p, "training")
    p.add_argument("--corpus", default=None, help="corpus directory (lemo.accuracy.corpus); not needed with --steps 0")
    p.add_argument("--out", required=True, help="directory for predictors.safetensors + predictors.json")
    p.add_argument("--steps", type=int, default=200, help="0 writes an untrained set (cost benchmarks)")
    p.add_argument("--batch", type=int, default=1, help="windows per step (default: 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    p.add_argument(
        "--loss",
        choices=["smooth_l1", "mse"],
        default="smooth_l1",
        help="loss between predicted and oracle block maps (default: smooth_l1)",
    )
    p.add_argument("--widths", default="128,64", help="the two ReLU layer widths of each path")
    p.add_argument("--per-head", action="store_true", help="separate weights per head (default: shared)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per block (default: 64)")
    p.add_argument("--sparse-layers", default=None, help="comma-separated; default: LeMoConfig's schedule")
    p.add_argument("--prune-every", type=int, default=50, help="elastic pruning period in steps (0: off)")
    p.add_argument(
        "--prune-fraction", type=float, default=0.1, help="share of each layer's width pruned per period (default: 0.1)"
    )
    p.add_argument("--min-width", type=int, default=16, help="pruning never narrows a layer below this (default: 16)")
    p.add_argument("--split", default="train", help="corpus split the windows come from (default: train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the predictor weights and of the windows (default: 0)")
    p.add_argument("--verbose", action="store_true", help="log the loss of every step and each pruning")
    p.set_defaults(func=_train_predictors)
    p = sub.add_parser("eval-predictors", help="per-layer recall of predictors vs the oracle (+ threshold tuning)")
    _model_window_args(p, "evaluation")
    p.add_argument("--predictors", required=True, help="directory written by train-predictors")
    p.add_argument("--corpus", required=True, help="corpus directory (lemo.accuracy.corpus)")
    p.add_argument("--out", required=True, help="CSV of recall rows")
    p.add_argument("--batches", type=int, default=8, help="batches of windows evaluated (default: 8)")
    p.add_argument("--batch", type=int, default=1, help="windows per batch (default: 1)")
    p.add_argument(
        "--keep-ratio",
        type=float,
        default=0.4,
        help="share of blocks kept: the oracle's top-k the recall is measured against (default: 0.4)",
    )
    p.add_argument(
        "--tune-thresholds",
        action="store_true",
        help="also tune per-layer score thresholds (on other windows) and report their recall",
    )
    p.add_argument(
        "--target-recall", type=float, default=0.9, help="recall the tuned thresholds aim for (default: 0.9)"
    )
    p.add_argument(
        "--metric",
        choices=["blocks", "mass"],
        default="blocks",
        help="what the tuned recall counts: oracle top-k blocks or their attention mass (default: blocks)",
    )
    p.add_argument("--thresholds-out", default=None, help="JSON (default: OUT with .thresholds.json)")
    p.add_argument("--split", default="heldout", help="corpus split the windows come from (default: heldout)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="windows: SEED+1 evaluated, SEED+2 for tuning; registry model weights (default: 0)",
    )
    p.set_defaults(func=_eval_predictors)
    return parser


def main(argv=None) -> int:
    from .progress import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad input files or values: a message, not a traceback
        raise SystemExit(f"lemo {args.command}: {err}") from err


if __name__ == "__main__":
    sys.exit(main())
