"""The regression gate (lemo check): every point a check covers must be measured, and failures say why."""

import pandas as pd
import pytest

from lemo.bench.check import Check, load_thresholds, read_results, run_checks
from lemo.bench.cli import main
from lemo.bench.sweep import Point

METRIC = "saved_activation_gib"
CHECK = Check("saves", METRIC, "lemo", min=1.5, max=3.0)


def _rows(method, ctx, status="ok", value=None, model="llama2-tiny", reason=None):
    base = dict(
        model=model,
        method=method,
        method_name=method,
        attention="sdpa-flash",
        gradient_checkpointing=False,
        context=ctx,
        batch_size=1,
        status=status,
        reason=reason,
        git_commit="abc",
    )
    if value is None:
        return [{**base, "metric": "status", "value": None}]
    return [{**base, "metric": METRIC, "value": value}]


def _frame(*groups):
    return pd.DataFrame([r for g in groups for r in g])


def _expected(methods=("lora", "lemo"), contexts=(256, 512), models=("llama2-tiny",)):
    return [
        Point(
            model=m,
            attention="sdpa-flash",
            gradient_checkpointing=False,
            context=c,
            method=x,
            method_name=x,
            options={},
        )
        for m in models
        for c in contexts
        for x in methods
    ]


GOOD = [
    _rows("lora", 256, value=2.0),
    _rows("lemo", 256, value=1.0),
    _rows("lora", 512, value=4.0),
    _rows("lemo", 512, value=2.0),
]


def test_all_points_within_bounds_pass(capsys):
    assert run_checks(_frame(*GOOD), [CHECK], _expected()) == []
    out = capsys.readouterr().out
    assert out.count("ok   saves:") == 2 and "ctx=512" in out and "lora 4 / lemo 2 = ratio 2.000" in out
    assert run_checks(_frame(*GOOD).drop(columns=["reason", "git_commit"]), [CHECK], _expected()) == []


@pytest.mark.parametrize(
    "status, reason, words",
    [
        ("oom", "out of memory", "lemo oom"),
        ("error", "ValueError: mlp_mode must be one of", "lemo error (ValueError: mlp_mode must be one of"),
        ("skipped", "failed at 256 tokens", "lemo skipped (failed at 256 tokens)"),
    ],
)
def test_a_failed_method_point_fails_the_check_naming_point_and_status(status, reason, words):
    frame = _frame(*GOOD[:3], _rows("lemo", 512, status, reason=reason))
    failures = run_checks(frame, [CHECK], _expected())
    assert len(failures) == 1 and failures[0].startswith("saves: llama2-tiny sdpa-flash gc=False ctx=512")
    assert words in failures[0] and "lora ok" in failures[0]


def test_a_missing_point_or_a_whole_missing_job_fails():
    (failure,) = run_checks(_frame(*GOOD[:3]), [CHECK], _expected())
    assert "ctx=512" in failure and "lemo missing (no record)" in failure
    failures = run_checks(_frame(*GOOD), [CHECK], _expected(models=("llama2-tiny", "llama3-tiny")))
    assert len(failures) == 2 and all(
        "llama3-tiny" in f and "lemo missing" in f and "lora missing" in f for f in failures
    )


def test_a_missing_or_failed_baseline_fails():
    (failure,) = run_checks(_frame(GOOD[1], *GOOD[2:]), [CHECK], _expected())
    assert "ctx=256" in failure and "lora missing" in failure
    (failure,) = run_checks(_frame(_rows("lora", 256, "error", reason="boom"), *GOOD[1:]), [CHECK], _expected())
    assert "lora error (boom)" in failure


def test_baseline_out_of_memory_where_lemo_fits_is_reported_as_a_win(capsys):
    frame = _frame(*GOOD[:2], _rows("lora", 512, "oom", reason="out of memory"), GOOD[3])
    assert run_checks(frame, [CHECK], _expected()) == []
    assert (
        "WIN  saves: llama2-tiny sdpa-flash gc=False ctx=512 b=1: lora oom (out of memory), lemo fits"
        in capsys.readouterr().out
    )
    frame = _frame(*GOOD[:2], _rows("lora", 512, "skipped", reason="out of memory at 256 tokens"), GOOD[3])
    assert run_checks(frame, [CHECK], _expected()) == []  # skipped after a smaller OOM: still a win


def test_out_of_bounds_and_empty_coverage_fail_with_numbers():
    (failure,) = run_checks(_frame(*GOOD), [Check("tight", METRIC, "lemo", min=2.5)], _expected())[:1]
    assert "ratio 2.000, bounds [2.5, None]" in failure and failure.startswith("tight:")
    (failure,) = run_checks(_frame(*GOOD), [Check("nothing", METRIC, "lemo", min=1.0, min_context=4096)])
    assert "covers no point" in failure


def test_duplicate_records_of_a_point_fail():
    (failure,) = run_checks(_frame(*GOOD, [{**GOOD[3][0], "git_commit": "def"}]), [CHECK], _expected())
    assert "lemo 2 records" in failure


@pytest.mark.parametrize(
    "text, words",
    [
        ("checks: []\n", "`checks` must be a non-empty list"),
        ("sweep: x.yaml\n", "`checks` must be a non-empty list"),
        ("checks:\n  - {name: a, metric: m, method: lemo}\n", r"checks\[0\] \(a\): check 'a': give min and/or max"),
        ("checks:\n  - {name: a, metric: m, method: lemo, min: '1.5'}\n", r"\(a\): Check: min must be a number"),
        ("checks:\n  - {name: a, metric: m, method: lemo, min: 2, max: 1}\n", "min 2 > max 1"),
        ("checks:\n  - {name: a, metric: m, method: lemo, min: 1, min_ctx: 5}\n", r"unknown keys \['min_ctx'\]"),
        ("checks:\n  - {name: a, metric: m, min: 1}\n", r"missing keys \['method'\]"),
        (
            "checks:\n  - {name: a, metric: m, method: x, min: 1}\n  - {name: a, metric: m, method: y, min: 1}\n",
            r"check names repeat: \['a'\]",
        ),
        ("checks: [ {name: a\n", "not valid YAML"),
        ("- a\n", "expected a mapping"),
        ("check: []\n", r"unknown keys \['check'\]"),
    ],
)
def test_bad_thresholds_files_fail_naming_file_and_key(tmp_path, text, words):
    path = tmp_path / "thresholds.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=words) as err:
        load_thresholds(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty file"),
        (
            "model,method,method_name,attention,gradient_checkpointing,context,batch_size,status,metric,value\n",
            r"no rows \(header only\)",
        ),
        ("a,b\n1,2\n", "missing columns"),
    ],
)
def test_bad_result_csvs_fail_naming_the_file(tmp_path, text, words):
    path = tmp_path / "sweep.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=words) as err:
        read_results(path)
    assert str(path) in str(err.value)


def test_cli_prints_each_failure_and_refuses_bad_inputs(tmp_path, capsys):
    csv = tmp_path / "sweep.csv"
    _frame(*GOOD[:3], _rows("lemo", 512, "oom", reason="out of memory")).to_csv(csv, index=False)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "name: t\nmethods: {lora: {method: lora}, lemo: {method: lemo}}\ngroups:\n"
        "  - {models: [llama2-tiny], attention: [sdpa-flash], gradient_checkpointing: false,\n"
        "     contexts: [256, 512], methods: [lora, lemo]}\n"
    )
    thresholds = tmp_path / "t.yaml"
    thresholds.write_text(
        f"sweep: sweep.yaml\nchecks:\n  - {{name: saves, metric: {METRIC}, method: lemo, min: 1.5}}\n"
    )
    assert main(["check", str(csv), "--thresholds", str(thresholds)]) == 1
    err = capsys.readouterr().err
    assert "1 failure(s)" in err and "FAIL saves: llama2-tiny sdpa-flash gc=False ctx=512 b=1: lemo oom" in err
    thresholds.write_text(f"checks:\n  - {{name: saves, metric: {METRIC}, method: lemo, min: 1.5}}\n")
    with pytest.raises(SystemExit, match="name the sweep it checks"):
        main(["check", str(csv), "--thresholds", str(thresholds)])
    assert main(["check", str(csv), "--thresholds", str(thresholds), "--sweep", str(sweep)]) == 1
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SystemExit, match=r"lemo check: .*empty.csv: empty file"):
        main(["check", str(tmp_path / "empty.csv"), "--thresholds", str(thresholds), "--sweep", str(sweep)])
