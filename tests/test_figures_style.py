"""Figures a reviewer reads without the code: one colour per method and one style per backend everywhere,
paper markers hollow, no empty panels, ceilings on kernel plots, and the headline figure."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from lemo.bench import figures as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Capture:
    """Keeps every figure a function draws (plt.close is a no-op while it is active)."""

    def __init__(self, monkeypatch):
        self.figs = []
        real = plt.subplots

        def subplots(*a, **k):
            fig, axes = real(*a, **k)
            self.figs.append(fig)
            return fig, axes

        monkeypatch.setattr(plt, "subplots", subplots)
        monkeypatch.setattr(plt, "close", lambda *a, **k: None)

    def lines(self):
        return [ln for fig in self.figs for ax in fig.axes for ln in ax.get_lines()]


def _point_rows(method, attention, context, gc, mem, tps, status="ok"):
    base = dict(
        model="llama2-7b",
        method=method,
        attention=attention,
        context=context,
        gradient_checkpointing=gc,
        batch_size=1,
        gpu="H200",
        git_commit="abc",
        status=status,
        method_name=method.split("-")[0],
    )
    if status != "ok":
        return [dict(base, metric="status", value=float("nan"))]
    return [
        dict(base, metric="peak_allocated_gib", value=mem),
        dict(base, metric="tokens_per_s", value=tps),
        dict(base, metric="step_s", value=context / tps),
    ]


def _sweep(rows_spec) -> pd.DataFrame:
    return pd.DataFrame([r for spec in rows_spec for r in _point_rows(*spec)])


def _style_of(lines, label):
    ln = next(ln for ln in lines if ln.get_label() == label)
    return to_hex(ln.get_color()), ln.get_linestyle(), ln.get_marker()


def test_same_method_same_colour_and_same_backend_same_style_across_figures(tmp_path, monkeypatch):
    cap = Capture(monkeypatch)
    a = _sweep(
        [
            ("lora", "sdpa-flash", 4096, False, 30, 9000),
            ("lora", "sdpa-flash", 8192, False, 50, 8000),
            ("lemo-channel", "sdpa-cudnn", 4096, False, 20, 9500),
            ("lemo-channel", "sdpa-cudnn", 8192, False, 30, 9100),
        ]
    )
    # another figure, other methods and backends first: the colour and style must not depend on position
    b = _sweep(
        [
            ("lemo-token", "eager", 4096, False, 25, 7000),
            ("lemo-token", "eager", 8192, False, 35, 6000),
            ("lemo-channel", "sdpa-cudnn", 4096, False, 21, 9400),
            ("lemo-channel", "sdpa-cudnn", 8192, False, 31, 9000),
            ("lora", "sdpa-flash", 4096, False, 31, 8900),
            ("lora", "sdpa-flash", 8192, False, 51, 7900),
            ("aaa-first", "sdpa-efficient", 4096, False, 40, 5000),
            ("aaa-first", "sdpa-efficient", 8192, False, 60, 4000),
        ]
    )
    F.plot_model(a, "llama2-7b", tmp_path / "a.png", pd.DataFrame())
    lines_a = cap.lines()
    F.plot_model(b, "llama2-7b", tmp_path / "b.png", pd.DataFrame())
    lines_b = [ln for ln in cap.lines() if ln not in lines_a]
    for label in ("lora / sdpa-flash", "lemo-channel / sdpa-cudnn"):
        assert _style_of(lines_a, label) == _style_of(lines_b, label)
    assert _style_of(lines_a, "lora / sdpa-flash")[0] == to_hex(F.METHOD_COLORS["lora"])
    marker = _style_of(lines_b, "lemo-channel / sdpa-cudnn")[2]
    assert marker == F.BACKEND_STYLES["sdpa-cudnn"]["marker"]
    # the frontier figure of the quality report gives lora the same colour
    from lemo.accuracy.quality import frontier_figure

    front = pd.DataFrame([dict(label="lora", memory_ratio=1.0, delta_pct=0.0, delta_spread=float("nan"), seeds=1)])
    frontier_figure(front, tmp_path / "f.png", [])
    ax = cap.figs[-1].axes[0]
    assert to_hex(ax.containers[0].lines[0].get_color()) == to_hex(F.METHOD_COLORS["lora"])


def test_every_backend_has_its_own_style():
    names = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "eager", "flash-attn"]
    styles = [(str(F.backend_style(n)["linestyle"]), F.backend_style(n)["marker"]) for n in names]
    assert len(set(styles)) == len(names)
    assert F.backend_style("something-new") == F.FALLBACK_BACKEND_STYLE


def test_no_empty_panels_metric_titles_and_hollow_paper_markers(tmp_path, monkeypatch):
    cap = Capture(monkeypatch)
    frame = _sweep([("lora", "sdpa-flash", 4096, False, 30, 9000), ("lora", "sdpa-flash", 8192, False, 50, 8000)])
    ref = pd.DataFrame(
        [
            dict(
                metric="peak_allocated_mib",
                model="llama2-7b",
                context=4096,
                method="lora",
                recompute=False,
                value=40000.0,
            ),
            dict(metric="step_time_ms", model="llama2-7b", context=16384, method="lora", recompute=True, value=4000.0),
        ]
    )  # a recomputation point only: no panel for it
    F.plot_model(frame, "llama2-7b", tmp_path / "x.png", ref)
    axes = cap.figs[-1].axes
    assert len(axes) == 2  # no recomputation rows: memory and throughput without recomputation only
    assert axes[0].get_title() == "peak allocated memory (GiB), without recomputation"
    assert axes[1].get_title() == "throughput (tokens/s), without recomputation"
    paper = [ln for ln in axes[0].get_lines() if F.PAPER_LABEL in ln.get_label()]
    assert len(paper) == 1 and paper[0].get_markerfacecolor() == "none"
    assert paper[0].get_label() == f"lora: {F.PAPER_LABEL}"


def test_kernel_figure_draws_the_measured_ceiling(tmp_path, monkeypatch):
    from lemo.bench.kernel_report import SPECS, kernel_figure

    cap = Capture(monkeypatch)
    d = pd.DataFrame(
        [
            dict(impl_name=i, variant="", context=c, ms=ms, gbps=g)
            for i, c, ms, g in [
                ("naive", 1024, 2.0, None),
                ("naive", 2048, 4.0, None),
                ("triton", 1024, 1.0, 3000.0),
                ("triton", 2048, 1.8, 3300.0),
                ("torch", 1024, 1.5, None),
                ("torch", 2048, 3.0, None),
            ]
        ]
    )
    kernel_figure(d, SPECS["movement"], "movement", tmp_path, {"copy_d2d": (4000.0, "GB/s")})
    rate_ax = cap.figs[-1].axes[1]
    assert any(list(ln.get_ydata()) == [4000.0, 4000.0] for ln in rate_ax.get_lines())
    assert any("measured ceiling" in t.get_text() for t in rate_ax.texts)


def _tiny_results(root: Path) -> None:
    rows = []
    for ctx, lora_mem, lemo_mem in [(2048, 20, 15), (4096, 30, 18)]:
        for m, mem, step in [
            ("lora", lora_mem, 1.0),
            ("lora-liger", lora_mem - 2, 1.1),
            ("lemo-shared-kept-deep40", lemo_mem, 0.5),
            ("lemo-paper", lemo_mem + 1, 0.9),
        ]:
            base = dict(
                model="llama3-8b",
                method=m,
                attention="sdpa-flash",
                context=ctx,
                gradient_checkpointing=False,
                batch_size=1,
                gpu="H200",
                git_commit="abc",
                status="ok",
                method_name="lora" if m == "lora" else ("lora-liger" if m == "lora-liger" else "lemo"),
            )
            rows += [dict(base, metric="peak_allocated_gib", value=mem), dict(base, metric="step_s", value=step)]
    (root / "h200-crossover").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "h200-crossover" / "sweep.csv", index=False)
    (root / "accuracy" / "smollm2").mkdir(parents=True)
    pd.DataFrame(
        [
            dict(label="lora", delta_pct=0.0, delta_spread=0.5, seeds=2, memory_ratio=1.0),
            dict(label="lemo-shared-kept-deep40", delta_pct=1.0, delta_spread=0.3, seeds=2, memory_ratio=1.9),
        ]
    ).to_csv(root / "accuracy" / "smollm2" / "frontier.csv", index=False)


def test_headline_from_a_tiny_results_folder(tmp_path):
    from lemo.bench.cli import main
    from lemo.bench.headline import headline_ratios

    _tiny_results(tmp_path / "results")
    r = headline_ratios(tmp_path / "results")
    mem = r[(r.metric == "peak_allocated_gib") & (r.method == "lemo-shared-kept-deep40")].set_index("context").ratio
    assert mem[2048] == pytest.approx(18 / 15)  # against lora-liger, the stronger of the two
    out = tmp_path / "fig" / "headline.png"
    assert main(["headline", "--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 10_000
