import re
import shlex
from pathlib import Path
import sys

from snakemake.settings.types import DeploymentMethod

from lemo.accuracy.experiment import load_experiment
from lemo.distributed.points import is_distributed
from lemo.bench.sweep import jobs, load_sweep

wildcard_constraints:
    kernel="[a-z_]+",
    model="[A-Za-z0-9_.-]+",


# Rules name their programs (`python -m lemo ...`, `torchrun`) and get them from their software environment:
# with --software-deployment-method conda (--use-conda) the rule's conda environment (environment.yml; it runs
# `python -m lemo` from the repository root, which imports the package from there); otherwise the
# environment of the interpreter that runs snakemake, whose bin directory goes first on the jobs' PATH (as
# Snakemake's own `script:` directive runs sys.executable), so `.venv/bin/snakemake` works without
# activating the venv. Not a `params:` entry: the interpreter's path is no parameter of a result, and a
# parameter that changes with the checkout's location would make every finished job look outdated.
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    shell.prefix(f"set -euo pipefail; export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\"; ")


# The sweep (config `sweep`, workflows/config.yaml): the CPU sweep unless a --config or a profile picks another
# (workflows/profiles/h200: the h200 sweep); nothing is detected from the machine while the workflow is parsed.
SWEEP_FILE = config["sweep"]
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

# Accuracy experiment (workflows/accuracy/NAME.yaml, config `accuracy`): by default the 17M-parameter model
# (small) with an h200* sweep, a tiny one (ci) with any other.
ACCURACY = config["accuracy"] or ("small" if NAME.startswith("h200") else "ci")
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
ACC_MODEL = config["accuracy_model"]
ACC_SOURCE = config["accuracy_corpus"]
# --config fresh=1 (or true, yes): measure every point again, keeping no earlier record.
FRESH = config["fresh"].lower() in ("true", "yes", "on") if isinstance(config["fresh"], str) else bool(config["fresh"])


def predictor_inputs(wildcards):
    """Predictor directories that a measure job's methods name (made by rule untrained_predictors)."""
    paths = {p.options.get("lemo", {}).get("predictor_path") for p in JOBS[wildcards.job].points}
    return sorted(p for p in paths if p)
