from pathlib import Path

import pandas as pd

from lemo.results import ratios, strongest_ratios
from lemo.targets import SWEEPS, target_rows, targets_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def _row(rows, start):
    return next(r for r in rows if r.target.startswith(start))


def test_ratio_targets_use_the_strongest_lora_family_row_of_one_run():
    rows = target_rows(RESULTS)
    best = 0.0
    for name in SWEEPS:  # independent of strongest_ratios: per sweep and commit, min over LoRA rows / each LeMo
        csv = RESULTS / name / "sweep.csv"
        if not csv.exists():
            continue
        f = pd.read_csv(csv)
        pt = f[(f.model == "llama2-7b") & (f.context == 8192) & (f.gradient_checkpointing == False)  # noqa: E712
               & (f.status == "ok") & (f.metric == "peak_allocated_gib")]
        for _, grp in pt.groupby("git_commit"):
            lora = grp[grp.method_name.isin(["lora", "lora-liger"])].value
            lemo = grp[grp.method.str.startswith("lemo")].value
            if len(lora) and len(lemo):
                best = max(best, lora.min() / lemo.min())
    assert _row(rows, "peak memory, 8K").measured.startswith(f"{best:.3f}x")
    # a LeMo point measured by another commit than LoRA's is not paired with it
    frame = pd.read_csv(RESULTS / "h200-kernels/sweep.csv")
    frame.loc[frame.method == "lemo-channel-kernels", "git_commit"] = "other"
    r = ratios(frame, "peak_allocated_gib", same_run=True)
    assert "lemo-channel-kernels" not in set(r.method) and len(r)


def test_strongest_baseline_is_any_backend_and_lora_liger_counts(tmp_path):
    rows = []
    for method, name, attention, value in [("lora", "lora", "sdpa-flash", 21.0), ("lora", "lora", "sdpa-cudnn", 15.0),
                                           ("lora-liger", "lora-liger", "sdpa-flash", 14.0),
                                           ("lemo-channel", "lemo", "sdpa-flash", 14.0),
                                           ("lemo-channel", "lemo", "sdpa-cudnn", 10.0)]:
        rows.append(dict(model="m", method=method, method_name=name, attention=attention,
                         gradient_checkpointing=True, context=65536, batch_size=1, status="ok", metric="step_s",
                         value=value, git_commit="c"))
    r = strongest_ratios(pd.DataFrame(rows), "step_s").set_index("attention")
    assert list(r.base_method) == ["lora-liger", "lora-liger"] and r.ratio["sdpa-cudnn"] == 1.4
    assert r.lora_ratio["sdpa-cudnn"] == 1.5 and r.lora_ratio["sdpa-flash"] == 1.5
    assert r.baselines.iloc[0] == "lora-liger/sdpa-flash, lora/sdpa-cudnn, lora/sdpa-flash"


def _frame(points, commit):
    return pd.DataFrame([dict(model="llama2-7b", method=m, method_name=m.split("-")[0] if m.startswith("lemo") else m,
                              attention=a, gradient_checkpointing=True, context=65536, batch_size=1, status="ok",
                              metric="step_s", value=v, git_commit=commit) for m, a, v in points])


def test_a_run_without_the_strongest_baseline_does_not_meet_the_target(tmp_path):
    weak = _frame([("lora", "sdpa-flash", 21.0), ("lemo-channel", "sdpa-flash", 13.0)], "a")  # 1.62x vs flash only
    strong = _frame([("lora", "sdpa-cudnn", 15.0), ("lemo-channel", "sdpa-cudnn", 12.0)], "b")  # 1.25x
    for name, frame in [("h200-target64k", weak), ("h200", strong)]:
        (tmp_path / name).mkdir()
        frame.to_csv(tmp_path / name / "sweep.csv", index=False)
    row = _row(target_rows(tmp_path), "step time, 64K")
    assert row.measured.startswith("1.615x") and "NOT against the strongest measured: lora (sdpa-cudnn) 15.00" in \
        row.measured and row.met == "no"
    strong.to_csv(tmp_path / "h200-target64k" / "sweep.csv", index=False)  # the same run with cuDNN LoRA in it
    row = _row(target_rows(tmp_path), "step time, 64K")
    assert row.measured.startswith("1.250x") and "NOT" not in row.measured and row.met == "no"


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
