"""The multi-GPU harness on CPU: torchrun launches of `lemo dist-bench`, the report, and dry runs of the
Snakemake rules, locally and through the Slurm profile (snakemake-executor-plugin-slurm 2.8.0)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lemo.bench.sweep import load_sweep
from lemo.distributed.points import dist_points, find_point

ROOT = Path(__file__).resolve().parent.parent
SWEEP = "workflows/sweeps/ci-multigpu.yaml"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _launch(point_id, out):
    p = find_point(load_sweep(ROOT / SWEEP), point_id)
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc-per-node",
        str(p.gpus),
        "-m",
        "lemo",
        "dist-bench",
        "--sweep",
        SWEEP,
        "--point",
        point_id,
        "--out",
        str(out),
    ]
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(Path(out).read_text())


@pytest.mark.parametrize(
    "point_id",
    [
        "sp__g2__llama3-tiny__sdpa-math__gc1__lemo-token__256",
        "ddp__g2__llama3-tiny__sdpa-math__gc0__lemo-token__128",
        "fsdp2__g2__llama3-tiny__sdpa-math__gc1__lemo-token__128",
    ],
)
def test_dist_bench_records_a_two_process_point(point_id, tmp_path):
    rec = _launch(point_id, tmp_path / "r.json")
    assert rec["status"] == "ok" and rec["id"] == point_id
    assert rec["world_size"] == 2 and rec["provenance"]["world_size"] == 2
    assert rec["parallelism"] == point_id.split("__")[0]
    m = rec["metrics"]
    assert len(m["per_rank"]) == 2 and m["step_s"] == max(r["step_s"] for r in m["per_rank"])
    per_step = 256 if rec["parallelism"] == "sp" else 2 * 128  # sp splits one sequence; ddp: one per rank
    assert m["tokens_per_step"] == per_step and m["tokens_per_s"] == pytest.approx(per_step / m["step_s"])
    assert 5.0 < m["loss"] < 7.5  # ~ln(512) for random weights: the loss of all ranks' tokens, not a share
    assert rec["provenance"]["git_commit"]


def test_failed_launch_leaves_a_record(tmp_path):
    point_id = "ddp__g1__llama3-tiny__sdpa-math__gc0__lora__128"
    log = tmp_path / "x.log"
    log.write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    out = tmp_path / "r.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lemo",
            "dist-bench",
            "--sweep",
            SWEEP,
            "--point",
            point_id,
            "--out",
            str(out),
            "--record-failure",
            str(log),
        ],
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    rec = json.loads(out.read_text())
    assert rec["status"] == "oom" and "Tried to allocate" in rec["reason"] and rec["metrics"] == {}


def test_report_scaling_and_max_context(tmp_path):
    from lemo.distributed.bench import record
    from lemo.distributed.report import frame, markdown, max_context, scaling

    sweep = load_sweep(ROOT / SWEEP)
    for p in dist_points(sweep):
        ok = not (p.parallelism == "sp" and p.gpus == 1 and p.method == "lora")
        metrics = {"tokens_per_s": 1000.0 * p.gpus * (0.9 if p.gpus > 1 else 1.0)}  # 90% efficient
        (tmp_path / f"{p.id}.json").write_text(json.dumps(record(p, "ok" if ok else "oom", metrics)))
    df = frame(sorted(tmp_path.glob("*.json")))
    eff = scaling(df).set_index(["method", "world_size"]).efficiency
    assert eff[("lora", 1)] == pytest.approx(1.0) and eff[("lora", 2)] == pytest.approx(0.9)
    best = max_context(df).set_index(["method", "world_size"]).max_context
    assert best[("lemo-token", 2)] == 256 and ("lora", 1) not in best.index
    assert "efficiency" in markdown(df)


def _dry_run(*args):
    done = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-n", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_snakemake_dry_run_of_the_multigpu_sweep():
    out = _dry_run("-p", "--cores", "4", "--resources", "gpu=4", "--config", f"sweep={SWEEP}")
    assert "--standalone --nproc-per-node 2 -m lemo dist-bench" in out
    assert out.count("rule dist_point:") == len(dist_points(load_sweep(ROOT / SWEEP)))


@pytest.mark.skipif(
    importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
    reason="snakemake-executor-plugin-slurm is not installed (pip install snakemake-executor-plugin-slurm==2.8.0)",
)
def test_slurm_profile_dry_run():
    out = _dry_run("--workflow-profile", "workflows/profiles/slurm")
    assert "Using workflow specific profile workflows/profiles/slurm" in out
    # every point asks its GPUs (sbatch --gpus=N) and CPUs per GPU, and no tasks (one task runs torchrun)
    for gpus in (1, 2, 4):
        assert f"gpu={gpus}, cpus_per_gpu=16" in out
    assert "tasks=" not in out
    assert out.count("torchrun --standalone --nproc-per-node") == len(
        dist_points(load_sweep(ROOT / "workflows/sweeps/h200-multigpu.yaml"))
    )
