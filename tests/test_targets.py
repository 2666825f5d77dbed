from pathlib import Path

import pandas as pd

from lemo.results import ratios
from lemo.targets import SWEEPS, target_rows, targets_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def _row(rows, start):
    return next(r for r in rows if r.target.startswith(start))


def test_ratio_targets_pair_lora_and_lemo_from_one_run():
    rows = target_rows(RESULTS)
    best = 0.0
    for name in SWEEPS:  # independent of same_run_ratios: per sweep, per commit, LoRA / each LeMo variant
        csv = RESULTS / name / "sweep.csv"
        if not csv.exists():
            continue
        f = pd.read_csv(csv)
        pt = f[(f.model == "llama2-7b") & (f.context == 8192) & (f.gradient_checkpointing == False)  # noqa: E712
               & (f.status == "ok") & (f.metric == "peak_allocated_gib")]
        for commit, grp in pt.groupby(["attention", "git_commit"]):
            by = grp.set_index("method").value
            if "lora" in by:
                best = max([best] + [by["lora"] / v for m, v in by.items() if m.startswith("lemo")])
    assert _row(rows, "peak memory, 8K").measured.startswith(f"{best:.3f}x")
    # a LeMo point measured by another commit than LoRA's is not paired with it
    frame = pd.read_csv(RESULTS / "h200-kernels/sweep.csv")
    frame.loc[frame.method == "lemo-channel-kernels", "git_commit"] = "other"
    r = ratios(frame, "peak_allocated_gib", same_run=True)
    assert "lemo-channel-kernels" not in set(r.method) and len(r)


def test_accuracy_targets_read_the_extended_length():
    rows = target_rows(RESULTS)
    a = pd.read_csv(RESULTS / "accuracy/small/accuracy.csv")
    ppl = a[(a.metric == "perplexity") & (a.context == 8192)].set_index("label").value
    delta = 100 * (ppl["lemo-token"] / ppl["lora"] - 1)
    row = _row(rows, "perplexity")
    assert f"lemo-token {delta:+.1f}%" in row.measured and row.met == ("yes" if delta <= 2 else "no")
    recall = pd.read_csv(RESULTS / "accuracy/small/predictors/recall.csv")
    best = recall[recall.layer.astype(str) == "all"].recall.max()
    assert f"{best:.1%}" in _row(rows, "predictor recall").measured


def test_missing_results_say_not_measured(tmp_path):
    text = targets_table(tmp_path)
    assert text.count("not measured") >= 6 and "yes" not in text
