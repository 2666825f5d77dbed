"""CI's regression check: fresh CPU measurements of LeMo vs LoRA, held to committed bounds."""

from pathlib import Path

import pandas as pd
import pytest

from lemo.bench import JobRunner
from lemo.check import Check, load_thresholds, run_checks
from lemo.cli import main
from lemo.results import aggregate
from lemo.sweep import expand, jobs, load_sweep

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ci_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("ci")
    for job in jobs(load_sweep(ROOT / "workflows/sweeps/ci.yaml")):
        JobRunner(job, out / job.id, log=lambda *_: None).run()
    aggregate(list(out.rglob("*.json")), out / "sweep.csv")
    return out / "sweep.csv"


def test_fresh_cpu_ratios_within_committed_bounds(ci_csv):
    assert main(["check", str(ci_csv), "--thresholds", str(ROOT / "workflows/thresholds/cpu.yaml")]) == 0


def test_check_fails_out_of_bounds_and_on_empty_matches(ci_csv):
    frame = pd.read_csv(ci_csv)
    assert run_checks(frame, [Check("too-good", "saved_activation_gib", "lemo-token", min=10.0)])
    assert run_checks(frame, [Check("nothing", "saved_activation_gib", "lemo-9000", min=1.0)])
    assert not run_checks(frame, [Check("fine", "saved_activation_gib", "lemo-token", min=1.0)])


def test_committed_h200_results_pass_their_thresholds():
    csv = ROOT / "results/h200/sweep.csv"
    checks, sweep = load_thresholds(ROOT / "workflows/thresholds/h200.yaml")
    failures = run_checks(pd.read_csv(csv), checks, expand(load_sweep(sweep)))
    assert not failures, failures
