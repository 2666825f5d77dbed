from pathlib import Path

import pandas as pd
import pytest

from lemo.figures import plot_all
from lemo.report import budgets, summary, targets, update_readme

ROOT = Path(__file__).resolve().parent.parent
CSV = ROOT / "results/h200/sweep.csv"


def test_summary_and_targets_come_from_the_csv():
    frame = pd.read_csv(CSV)
    text = summary(frame, paper_csv=ROOT / "results/reference/jenga_ae_a800.csv",
                   probe_csv=ROOT / "results/reference/h200_lora_baseline.csv")
    assert "| llama2-7b | sdpa-flash | 8192 |" in text and "OOM" in text
    t = targets(frame)
    lora, lemo = frame[(frame.model == "llama2-7b") & (frame.context == 8192) & (frame.attention == "sdpa-flash")
                       & (frame.gradient_checkpointing == False) & (frame.metric == "peak_allocated_gib")  # noqa: E712
                       ].set_index("method").value[["lora", "lemo-channel"]]
    assert f"{lora / lemo:.2f}x" in t


def test_budget_target_reads_every_memory_view_and_marks_oom():
    frame = pd.read_csv(ROOT / "results/h200-256k/sweep.csv")
    rows = {line.split(" | ")[3]: line for line in budgets(frame).splitlines()[2:]}
    peaks = frame[frame.metric == "nvml_peak_used_gib"].set_index("method").value
    assert rows["lemo-channel-all-offload"].endswith("| yes |") and f"{peaks['lemo-channel-all-offload']:.1f}" in \
        rows["lemo-channel-all-offload"]
    assert "| OOM |" in rows["lora"] and rows["lora"].endswith("| no |")
    over = frame.copy()  # the same point with its device peak above the budget is not within it
    over.loc[over.metric == "nvml_peak_used_gib", "value"] = 81.0
    assert budgets(over).splitlines()[2:][1].endswith("| no |")


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
    from lemo.bench import JobRunner
    from lemo.results import aggregate
    from lemo.sweep import jobs, load_sweep

    job = jobs(load_sweep(ROOT / "workflows/sweeps/ci.yaml"))[0]
    JobRunner(job, tmp_path / "rec", log=lambda *_: None).run()
    aggregate(list((tmp_path / "rec").glob("*.json")), tmp_path / "sweep.csv")
    text = summary(pd.read_csv(tmp_path / "sweep.csv"))
    assert "Saved activations (GiB), no recomputation" in text and "lora/lemo-channel" in text
    assert plot_all(tmp_path / "sweep.csv", tmp_path / "fig")
