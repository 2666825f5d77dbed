"""CI's regression check: fresh CPU measurements of LeMo vs LoRA, held to committed bounds."""

from pathlib import Path

import pandas as pd
import pytest

from lemo.bench.bench import JobRunner
from lemo.bench.check import Check, load_thresholds, run_checks
from lemo.bench.cli import main
from lemo.bench.results import aggregate
from lemo.bench.sweep import expand, jobs, load_sweep

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


@pytest.mark.parametrize("name", ["h200", "h200-target8k", "h200-target64k"])
def test_committed_h200_results_pass_their_thresholds(name):
    csv = ROOT / f"results/{name}/sweep.csv"
    checks, sweep = load_thresholds(ROOT / f"workflows/thresholds/{name}.yaml")
    failures = run_checks(pd.read_csv(csv), checks, expand(load_sweep(sweep)))
    assert not failures, failures


def test_strongest_lora_check_holds_lemo_to_the_fastest_backend_of_lora():
    from lemo.bench.results import ratios

    frame = pd.read_csv(ROOT / "results/h200/sweep.csv")
    per_backend = ratios(frame, "step_s", same_run=True)
    per_backend = per_backend[(per_backend.method == "lemo-channel") & (per_backend.context >= 65536)]
    top = per_backend.ratio.max()  # LeMo on flash against LoRA on flash
    loose = dict(
        metric="step_s", method="lemo-channel", gradient_checkpointing=True, min_context=65536, min=top * 0.999
    )
    assert len(run_checks(frame, [Check("per-backend", **loose)])) < len(per_backend)  # the flash pair passes
    assert run_checks(frame, [Check("strongest", baseline="strongest-lora", **loose)])  # LoRA on cuDNN is faster
    with pytest.raises(ValueError, match="lower-is-better"):
        run_checks(
            frame,
            [Check("x", "tokens_per_s", "lemo-channel", baseline="strongest-lora", higher_is_better=True, min=1.0)],
        )
