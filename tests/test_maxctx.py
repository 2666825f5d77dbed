"""Max-context search: exact results with a fake step, and the harness plumbing on CPU with a simulated OOM."""

import json
import re

import pandas as pd
import pytest
import torch

import lemo.bench.bench as bench
from lemo.bench.cli import main
from lemo.bench.maxctx import Probe, find_search, run_search, search_max_context, searches
from lemo.bench.maxctx_report import memory_fit_context, results_frame, table

K = 1024


def fake_step(fits_up_to: int, seconds_per_token: float = 0.0, status: str = "oom"):
    calls = []

    def probe(ctx):
        calls.append(ctx)
        if ctx > fits_up_to:
            return Probe(ctx, status)
        return Probe(ctx, "ok", step_s=ctx * seconds_per_token, peak_gib=ctx / K)

    return probe, calls


def test_doubling_then_bisection_finds_the_largest_fitting_multiple_of_the_granularity():
    probe, calls = fake_step(200_000)
    r = search_max_context(probe, start=8 * K, limit=1024 * K, granularity=8 * K)
    assert r.max_context == 192 * K and r.bound == "memory"  # 196608 <= 200000 < 204800
    assert r.best.context == 192 * K and r.best.peak_gib == 192
    assert calls == [
        8 * K,
        16 * K,
        32 * K,
        64 * K,
        128 * K,
        256 * K,  # doubling up to the first OOM
        192 * K,
        224 * K,
        208 * K,
        200 * K,
    ]  # bisection between 128K and 256K


def test_exact_power_of_two_and_failure_at_start():
    probe, _ = fake_step(64 * K)
    assert search_max_context(probe, 8 * K, 1024 * K).max_context == 64 * K
    probe, calls = fake_step(4 * K)
    r = search_max_context(probe, 8 * K, 1024 * K)
    assert (r.max_context, r.bound, r.best, calls) == (0, "memory", None, [8 * K])


def test_a_step_predicted_over_the_time_bound_is_not_run():
    # linear fake time, 131 s at 128K: a quadratic scale-up allows 192K, and from there (197 s) less than
    # 240K, a quarter more: the search stops without running a probe predicted over the bound
    probe, calls = fake_step(10**9, seconds_per_token=1e-3)
    r = search_max_context(probe, 8 * K, 4096 * K, time_bound_s=300)
    assert (r.max_context, r.bound) == (192 * K, "time") and calls[-2:] == [128 * K, 192 * K]
    assert max(p.step_s for p in r.probes) < 300
    # a measured step over the bound (the prediction was too low) also stops it, and still counts as a fit
    probe, calls = fake_step(10**9, seconds_per_token=1e-3)
    r = search_max_context(lambda c: probe(c) if c < 64 * K else Probe(c, "ok", step_s=400.0), 8 * K, 4096 * K)
    assert (r.max_context, r.bound, r.best.step_s) == (64 * K, "time", 400.0)


def test_the_memory_prediction_jumps_near_the_capacity_and_gallops_to_the_failure():
    def probe(ctx):  # 12 GiB of weights + 1 GiB per 1K tokens; fits up to 200,000 tokens
        calls.append(ctx)
        return Probe(ctx, "oom") if ctx > 200_000 else Probe(ctx, "ok", step_s=0.0, peak_gib=12 + ctx / K)

    calls = []
    r = search_max_context(probe, 8 * K, 1024 * K, capacity_gib=180.0, margin=0.95)
    assert (r.max_context, r.bound) == (192 * K, "memory")
    # 0.95 * 180 GiB predicts 159K -> 152K; gallop +8K, +16K, +32K to the OOM; bisect 176K..208K
    assert calls == [8 * K, 16 * K, 152 * K, 160 * K, 176 * K, 208 * K, 192 * K, 200 * K]
    calls = []
    r = search_max_context(probe, 8 * K, 1024 * K, capacity_gib=300.0)  # an optimistic capacity: bisection
    assert (r.max_context, r.bound, calls[:3]) == (192 * K, "memory", [8 * K, 16 * K, 272 * K])


def test_limit_and_host_ram_bounds():
    probe, _ = fake_step(10**9)
    r = search_max_context(probe, 8 * K, 100 * K)
    assert (r.max_context, r.bound) == (100 * K, "limit")
    probe, _ = fake_step(40 * K, status="host-oom")
    r = search_max_context(probe, 8 * K, 1024 * K)
    assert (r.max_context, r.bound) == (40 * K, "host-ram")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of granularity"):
        search_max_context(lambda c: Probe(c, "ok"), 1000, 8192, granularity=8192)


SWEEP = {
    "name": "t",
    "device": "cpu",
    "dtype": "float32",
    "warmup": 0,
    "steps": 1,
    "lora": {"r": 8, "alpha": 16, "targets": "qkvo", "adapter_dtype": "model"},
    "methods": {"lora": {"method": "lora"}},
    "max_context": {"start": 64, "limit": 1024, "granularity": 64, "caps_gib": [None]},
    "groups": [
        {
            "models": ["llama2-tiny"],
            "attention": ["sdpa-math"],
            "gradient_checkpointing": True,
            "contexts": [64],
            "methods": ["lora"],
        }
    ],
}


def test_search_on_the_harness_records_every_probe_and_resumes(tmp_path, monkeypatch):
    real, ran = bench.time_steps, []

    def oom_above_300(model, batch, optimizer, warmup, steps, **kw):
        ran.append(batch["input_ids"].shape[1])
        if batch["input_ids"].shape[1] > 300:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, batch, optimizer, warmup, steps, **kw)

    monkeypatch.setattr(bench, "time_steps", oom_above_300)
    (s,) = searches(SWEEP)
    assert s.id == "llama2-tiny__sdpa-math__gc1__lora__full" and find_search(SWEEP, s.id) is not None
    out = run_search(SWEEP, s.id, tmp_path, log=lambda *_: None)
    assert (out["max_context"], out["bound"]) == (256, "memory") and out["step_s"] > 0
    assert ran == [64, 128, 256, 512, 384, 320]  # no capacity on CPU: plain doubling, then bisection
    recs = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("sdpa-math__*.json")}
    assert len(recs) == 6 and recs["sdpa-math__lora__512__b1.json"]["status"] == "oom"
    # run again: every probe is read back, none measured
    ran.clear()
    assert run_search(SWEEP, s.id, tmp_path, log=lambda *_: None)["max_context"] == 256 and ran == []
    # a probe the process died in (still "started") ends the search there
    rec = recs["sdpa-math__lora__256__b1.json"]
    (tmp_path / "sdpa-math__lora__256__b1.json").write_text(json.dumps({**rec, "status": "started", "metrics": {}}))
    assert run_search(SWEEP, s.id, tmp_path, log=lambda *_: None)["bound"] == "killed"


def _probes(*fits, oom=None):
    """Probe dicts of a search: (context, peak GiB) per fit, then an out-of-memory probe at `oom`."""
    probes = [dict(context=c, status="ok", step_s=1.0, peak_gib=g) for c, g in fits]
    return probes + ([dict(context=oom, status="oom", step_s=None, peak_gib=None)] if oom else [])


def test_memory_fit_context_is_the_line_through_the_two_longest_fits_at_the_cap():
    # 20 GiB at 100K, 30 GiB at 200K: 10 GiB per 100K reaches 80 GiB at 700K (716800), run in any order
    probes = _probes((200 * K, 30.0), (50 * K, 5.0), (100 * K, 20.0), oom=800 * K)
    search = dict(probes=probes, cap_gib=80.0, device_total_gib=139.8)
    assert memory_fit_context(search) == 696 * K  # rounded down to the default granularity, 8K
    assert memory_fit_context({**search, "settings": {"granularity": 16 * K}}) == 688 * K
    # without a cap the line goes to the device's memory
    assert memory_fit_context({**search, "cap_gib": None, "device_total_gib": 80.0}) == 696 * K
    # a probe written with keys a later harness added (e.g. its error) is still read
    assert memory_fit_context({**search, "probes": [{**p, "reason": "x"} for p in probes]}) == 696 * K
    # no line: one fit, or peaks that do not grow
    assert pd.isna(memory_fit_context({**search, "probes": _probes((100 * K, 20.0), oom=200 * K)}))
    assert pd.isna(memory_fit_context({**search, "probes": _probes((100 * K, 20.0), (200 * K, 20.0))}))


def test_report_csv_table_and_figure(tmp_path):
    def result(method, cap, ctx, bound, probes=()):
        d = tmp_path / f"{method}-{cap}"
        d.mkdir()
        (d / "result.json").write_text(
            json.dumps(
                {
                    "model": "llama2-7b",
                    "method": method,
                    "attention": "sdpa-cudnn",
                    "gradient_checkpointing": True,
                    "cap_gib": cap,
                    "max_context": ctx,
                    "step_s": 1.0,
                    "peak_gib": 70.0,
                    "bound": bound,
                    "device_total_gib": 139.8,
                    "probes": list(probes),
                    "options": {},
                    "provenance": {"gpu": "H", "git_commit": "abc"},
                }
            )
        )
        return d

    dirs = [
        result("lora", 80, 64 * K, "memory"),
        # found its limit: no fit shown, but how far its fit (144K) overshoots the measured 128K
        result("lora-liger", 80, 128 * K, "memory", _probes((64 * K, 40.0), (128 * K, 72.0), oom=136 * K)),
        result("lora-liger-offload", 80, 160 * K, "time", _probes((80 * K, 30.0), (160 * K, 40.0))),  # fit: 480K
        result("lemo-channel", 80, 320 * K, "time", _probes((100 * K, 20.0), (200 * K, 30.0))),  # fit: 696K
        result("lora", None, 96 * K, "memory"),
    ]
    assert (
        main(
            [
                "max-context-report",
                *map(str, dirs),
                "--csv",
                str(tmp_path / "m.csv"),
                "--figure",
                str(tmp_path / "m.png"),
                "--out",
                str(tmp_path / "m.md"),
            ]
        )
        == 0
    )
    frame = pd.read_csv(tmp_path / "m.csv")
    assert {"method", "model", "cap_gib", "max_context", "step_s", "peak_gib", "bound", "git_commit"} <= set(frame)
    by_method = frame[frame.cap_gib == 80].set_index("method")
    assert by_method.memory_fit_context.dropna().to_dict() == {"lemo-channel": 696 * K, "lora-liger-offload": 480 * K}
    assert by_method.fit_overshoot_pct.dropna().to_dict() == {"lora-liger": 100 * (144 / 128 - 1)}
    text = re.sub(r" +", " ", (tmp_path / "m.md").read_text())  # the table is padded by tabulate
    # fit ratios are against the best LoRA-family fit of the group (480K), beside the measured ones (160K)
    assert "| lemo-channel | sdpa-cudnn | True | 320K | 1.0 | 70.0 | time | 2.00x | 696K (fit) | 1.45x | |" in text
    assert (
        "| lora-liger-offload | sdpa-cudnn | True | 160K | 1.0 | 70.0 | time | 1.00x | 480K (fit) | 1.00x | |" in text
    )
    assert "| lora-liger | sdpa-cudnn | True | 128K | 1.0 | 70.0 | memory | 0.80x | | | +12% |" in text
    assert "| 64K | 1.0 | 70.0 | memory | 0.40x | | | |" in text  # no fit: empty, not 0
    assert "an extrapolation, not a measurement" in text
    assert "| llama2-7b | full GPU | lora |" in text and (tmp_path / "m.png").stat().st_size > 0
    assert table(results_frame([d / "result.json" for d in dirs])).count("\n") == 6


def test_figure_draws_the_fit_as_an_extrapolated_extension_of_the_measured_bar():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lemo.bench.maxctx_report import _fit_extensions

    grp = pd.DataFrame(dict(max_context=[88 * K, 296 * K], memory_fit_context=[float("nan"), 472 * K]))
    fig, ax = plt.subplots()
    ax.barh(["lora", "lemo"], grp.max_context / 1024)
    _fit_extensions(ax, grp, ["lora", "lemo"])
    (extension,) = ax.containers[1]  # only the row with a fit gets one, from its measured bar to the fit
    assert (extension.get_x(), extension.get_width(), extension.get_fill()) == (296, 472 - 296, False)
    assert ax.get_legend_handles_labels()[1] == ["peak-memory fit (extrapolated)"]
    plt.close(fig)
