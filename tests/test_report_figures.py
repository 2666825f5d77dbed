import re
from pathlib import Path

import pandas as pd
import pytest

from lemo.bench.figures import plot_all
from lemo.bench.report import budgets, summary, targets, update_readme

ROOT = Path(__file__).resolve().parent.parent
CSV = ROOT / "results/h200/sweep.csv"


def _squash(text: str) -> str:
    """Tables are padded by tabulate: one space between cells and bars."""
    return re.sub(r" +", " ", text)


def test_summary_and_targets_come_from_the_csv():
    frame = pd.read_csv(CSV)
    text = _squash(
        summary(
            frame,
            paper_csv=ROOT / "results/reference/jenga_ae_a800.csv",
            probe_csv=ROOT / "results/reference/h200_lora_baseline.csv",
        )
    )
    assert "| llama2-7b | sdpa-flash | 8192 |" in text and "OOM" in text
    t = targets(frame)
    lora, lemo = (
        frame[
            (frame.model == "llama2-7b")
            & (frame.context == 8192)
            & (frame.attention == "sdpa-flash")
            & ~frame.gradient_checkpointing.astype(bool)
            & (frame.metric == "peak_allocated_gib")  # noqa: E712
        ]
        .set_index("method")
        .value[["lora", "lemo-channel"]]
    )
    assert f"{lora / lemo:.2f}x" in t


def _budget_rows(frame):
    return {line.split(" | ")[3]: line for line in _squash(budgets(frame)).splitlines()[2:]}


def test_budget_target_reads_every_memory_view_and_marks_oom():
    frame = pd.read_csv(ROOT / "results/h200-256k/sweep.csv")
    rows = _budget_rows(frame)
    peaks = frame[frame.metric == "nvml_peak_used_gib"].set_index("method").value
    assert rows["lemo-channel-all-offload"].endswith("| yes |")
    assert f"{peaks['lemo-channel-all-offload']:.1f}" in rows["lemo-channel-all-offload"]
    assert "| OOM |" in rows["lora"] and rows["lora"].endswith("| no |")
    m = frame.metric
    over = frame.copy()  # the same point with only its device peak above the budget is not within it
    over.loc[(over.method == "lemo-channel-all-offload") & (m == "nvml_peak_used_gib"), "value"] = 81.0
    assert _budget_rows(over)["lemo-channel-all-offload"].endswith("| no |")
    small_oom = frame.copy()  # an OOM is never within, however low the peak it reached
    small_oom.loc[(small_oom.method == "lora") & m.str.startswith("peak_"), "value"] = 10.0
    assert _budget_rows(small_oom)["lora"].endswith("| no |")
    no_nvml = frame[m != "nvml_peak_used_gib"]
    assert _budget_rows(no_nvml)["lemo-channel-all-offload"].endswith("| yes (allocator) |")
    skipped = frame.copy()
    skipped.loc[skipped.method == "lemo-channel-all", "status"] = "error"
    assert _budget_rows(skipped)["lemo-channel-all"].endswith("| - |")


def test_readme_block_replaced_and_missing_block_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:x -->\nold\n<!-- /results:x -->\nb\n")
    update_readme(readme, "x", "new")
    assert readme.read_text() == "a\n<!-- results:x -->\nnew\n<!-- /results:x -->\nb\n"
    with pytest.raises(ValueError, match="no <!-- results:y -->"):
        update_readme(readme, "y", "new")


def test_figures_drawn_per_model_with_oom_points(tmp_path):
    paths = plot_all(CSV, tmp_path, ROOT / "results/reference/jenga_ae_a800.csv")
    assert sorted(p.name for p in paths) == ["llama2-7b.png", "llama3-8b.png"]
    assert all(p.stat().st_size > 20_000 for p in paths)


def test_cpu_sweeps_report_saved_bytes(tmp_path):
    """A CPU sweep has no allocator peaks: the report and figures use saved activation bytes."""
    from lemo.bench.bench import JobRunner
    from lemo.bench.results import aggregate
    from lemo.bench.sweep import jobs, load_sweep

    job = jobs(load_sweep(ROOT / "workflows/sweeps/ci.yaml"))[0]
    JobRunner(job, tmp_path / "rec", log=lambda *_: None).run()
    aggregate(list((tmp_path / "rec").glob("*.json")), tmp_path / "sweep.csv")
    text = summary(pd.read_csv(tmp_path / "sweep.csv"))
    assert "Saved activations (GiB), no recomputation" in text and "lora/lemo-channel" in text
    assert plot_all(tmp_path / "sweep.csv", tmp_path / "fig")
