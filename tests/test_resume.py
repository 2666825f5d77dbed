"""Resumable sweep jobs: a killed job keeps every record it finished, and a rerun measures only the rest."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import yaml

import lemo.bench.bench as bench
from lemo.bench.sweep import jobs
from tests.test_sweep_bench import SWEEP

ROOT = Path(__file__).resolve().parent.parent

# Runs the job in a child process that SIGKILLs itself while measuring its third point.
KILLED_AT_THIRD_POINT = """
import os, signal, sys
from pathlib import Path
import yaml
import lemo.bench.bench as bench
from lemo.bench.sweep import jobs
real, calls = bench.time_steps, []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
bench.time_steps = dying
bench.JobRunner(jobs(yaml.safe_load(sys.argv[1]))[0], Path(sys.argv[2]), log=lambda *_: None).run()
"""


def _sweep():
    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))
    sweep.update(warmup=0, steps=1)
    sweep["groups"][0].update(attention=["sdpa-math"], contexts=[128, 256], saved_bytes=False)  # 4 points
    return sweep


def _measured(monkeypatch):
    seen = []
    real = bench.time_steps

    def spy(model, batch, *args, **kwargs):
        seen.append(batch["input_ids"].shape[1])
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(bench, "time_steps", spy)
    return seen


def test_killed_job_keeps_finished_records_and_rerun_measures_only_the_rest(tmp_path, monkeypatch):
    sweep = _sweep()
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AT_THIRD_POINT, yaml.safe_dump(sweep), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    kept = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    assert sorted(kept) == ["sdpa-math__lemo-token__128__b1.json", "sdpa-math__lora__128__b1.json"]
    seen = _measured(monkeypatch)
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    assert seen == [256, 256]  # only the point in flight and the one after it
    for name, text in kept.items():
        assert (tmp_path / name).read_text() == text  # finished records untouched
    assert len(list(tmp_path.glob("*.json"))) == 4


def test_records_of_other_code_or_options_and_errors_are_measured_again(tmp_path, monkeypatch):
    sweep = _sweep()
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    seen = _measured(monkeypatch)
    old = tmp_path / "sdpa-math__lora__128__b1.json"
    rec = json.loads(old.read_text())
    old.write_text(json.dumps({**rec, "provenance": {**rec["provenance"], "git_commit": "0" * 40}}))
    err = tmp_path / "sdpa-math__lora__256__b1.json"
    err.write_text(json.dumps({**json.loads(err.read_text()), "status": "error"}))
    sweep["methods"]["lemo-token"]["lemo"]["block_size"] = 32  # another configuration of lemo-token
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    assert seen == [128, 128, 256, 256]
    seen.clear()
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    assert seen == []  # everything is this run's now
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None, resume=False).run()
    assert seen == [128, 128, 256, 256]


def test_an_out_of_memory_record_kept_still_skips_longer_contexts(tmp_path, monkeypatch):
    sweep = _sweep()
    sweep["groups"][0].update(contexts=[128, 256, 512], methods=["lora"])
    real = bench.time_steps

    def oom_at_256(model, batch, *args, **kwargs):
        if batch["input_ids"].shape[1] == 256:
            raise bench.torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(bench, "time_steps", oom_at_256)
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    seen = _measured(monkeypatch)
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    assert seen == []  # no model built or measured
    assert (
        json.loads((tmp_path / "sdpa-math__lora__512__b1.json").read_text())["reason"] == "out of memory at 256 tokens"
    )
