import re
from pathlib import Path
import shutil
import subprocess
import sys

from lemo.accuracy.experiment import load_experiment
from lemo.distributed.points import is_distributed
from lemo.bench.sweep import jobs, load_sweep

wildcard_constraints:
    kernel="[a-z_]+",
    model="[A-Za-z0-9_.-]+",


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


# Only this sweep's results can be made here: asking for another sweep's files must not run this
# sweep's jobs under its name (select that sweep with --config sweep=...).
wildcard_constraints:
    name=re.escape(NAME),


# A `kind: distributed` sweep (multi-GPU points, workflows/rules/distributed.smk) has no single-GPU jobs.
DISTRIBUTED = is_distributed(SWEEP)
JOBS = {} if DISTRIBUTED else {job.id: job for job in jobs(SWEEP)}
MODELS = sorted({job.model for job in JOBS.values()})

# Accuracy experiment (workflows/accuracy/NAME.yaml): the 17M-parameter model on a GPU, a tiny one on CPU.
ACCURACY = config.get("accuracy") or ("small" if NAME.startswith("h200") else "ci")
ACCURACY_FILE = f"workflows/accuracy/{ACCURACY}.yaml"
load_experiment(ACCURACY_FILE)  # validated: a bad key or option fails here, before any job runs
with open(ACCURACY_FILE) as _f:
    import yaml as _yaml

    _acc = _yaml.safe_load(_f)
ACCURACY_METHODS = sorted(_acc["methods"])
# Methods whose options name the predictor directory ("{predictors}") wait for train-predictors.
ACC_NEEDS_PREDICTORS = {m for m, o in _acc["methods"].items() if "{predictors}" in str(o)}
ACC_PRED = _acc.get("predictors", {})  # context, steps, batch for train-predictors
ACC_ROPE = _acc["finetune"]["rope_factor"]
# A pretrained model by registry name (e.g. smollm2-135m): no pretraining; workflows/rules/quality.smk.
ACC_PRETRAINED = _acc.get("model")
ACC_SEEDS = _acc["finetune"].get("seeds") or [_acc["finetune"].get("seed", 0)]
# A real checkpoint and text corpus instead of the built-in ones:
#   snakemake --cores all --config accuracy_model=/path/to/hf_checkpoint accuracy_corpus=/path/to/texts
ACC_MODEL = config.get("accuracy_model")
ACC_SOURCE = config.get("accuracy_corpus")
