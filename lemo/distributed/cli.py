"""`lemo dist-bench` / `lemo dist-points` / `lemo dist-report` (imports stay lazy: the CLI starts fast)."""

from __future__ import annotations


def _bench(args) -> int:
    from .bench import run

    return run(args)


def register(sub) -> None:
    p = sub.add_parser("dist-bench", help="one multi-GPU sweep point under torchrun (lemo.distributed.bench)")
    p.add_argument("--sweep", required=True, help="a `kind: distributed` sweep file")
    p.add_argument("--point", required=True, help="point id (see `lemo dist-points`)")
    p.add_argument("--out", required=True, help="JSON record")
    p.add_argument(
        "--record-failure",
        default=None,
        metavar="LOG",
        help="write a failed/oom record for the point from torchrun's log instead of running",
    )
    p.set_defaults(func=_bench)
    p = sub.add_parser("dist-points", help="list the points of a distributed sweep")
    p.add_argument("--sweep", required=True, help="a `kind: distributed` sweep file")
    p.set_defaults(func=_list_points)
    register_report(sub)


def _list_points(args) -> int:
    from ..bench.sweep import load_sweep
    from .points import dist_points

    for p in dist_points(load_sweep(args.sweep)):
        print(p.id, p.gpus)
    return 0


def _report(args) -> int:
    from .report import run

    return run(args)


def register_report(sub) -> None:
    p = sub.add_parser("dist-report", help="multi-GPU records -> CSV + markdown scaling table")
    p.add_argument("records", nargs="+", help="record directories")
    p.add_argument("--out", required=True, help="CSV")
    p.add_argument("--md", default=None, help="markdown summary")
    p.set_defaults(func=_report)
