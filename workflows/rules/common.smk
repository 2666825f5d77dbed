import shutil
import subprocess
import sys

from lemo.sweep import jobs, load_sweep

PY = sys.executable  # the interpreter running snakemake has lemo installed


def detect_sweep():
    """workflows/sweeps/h200.yaml when a CUDA GPU answers nvidia-smi, else workflows/sweeps/cpu.yaml."""
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            names = ""
        if names:
            return "workflows/sweeps/h200.yaml"
    return "workflows/sweeps/cpu.yaml"


SWEEP_FILE = config.get("sweep") or detect_sweep()
SWEEP = load_sweep(SWEEP_FILE)
NAME = SWEEP["name"]
JOBS = {job.id: job for job in jobs(SWEEP)}
MODELS = sorted({job.model for job in JOBS.values()})
