# LeMo benchmark workflow: sweep -> one JSON record per point -> aggregate CSV -> figures; and the
# accuracy experiment (corpus -> pretraining -> predictors -> fine-tuning per method -> perplexity).
#
#   snakemake --cores all                                              # the CPU sweep
#   snakemake --cores all --workflow-profile workflows/profiles/h200   # the H200 sweep, on one GPU
#
# The sweep file (workflows/sweeps/*.yaml) defines models, methods, backends and contexts. Configuration:
# workflows/config.yaml holds the defaults (the cpu sweep; nothing is detected from the machine), --config
# KEY=VALUE or a profile's `config:` list overrides them (`--config sweep=workflows/sweeps/h200.yaml`), and
# workflows/schema/config.schema.yaml checks the result. Rules that run code name environment.yml as their
# conda environment (`snakemake --use-conda` builds it; without it they run in the environment of the
# interpreter running snakemake); `snakemake --lint` reports nothing (tests/test_snakemake_lint.py).
# Multi-GPU points (workflows/sweeps/h200-multigpu.yaml) run one torchrun per point; on a Slurm cluster:
#   snakemake --workflow-profile workflows/profiles/slurm

from snakemake.utils import min_version, validate

min_version("8.0")


configfile: "workflows/config.yaml"


validate(config, "workflows/schema/config.schema.yaml")


include: "workflows/rules/common.smk"
include: "workflows/rules/sweep.smk"
if ACC_PRETRAINED:  # a real pretrained model: fidelity screen, seeded extension runs, frontier
    include: "workflows/rules/quality.smk"
else:  # a small model pretrained here
    include: "workflows/rules/accuracy.smk"
include: "workflows/rules/predictors.smk"
include: "workflows/rules/maxctx.smk"
include: "workflows/rules/distributed.smk"


# A max-context sweep (a `max_context` section) makes its table and figure instead of the step sweep.
STEP_OUTPUTS = [f"results/{NAME}/sweep.csv", f"results/{NAME}/summary.md",
                *expand("figures/{name}/{model}.png", name=NAME, model=MODELS),
                f"results/accuracy/{ACCURACY}/summary.md"]
MAXCTX_OUTPUTS = [f"results/{NAME}/max_context.csv", f"results/{NAME}/max_context.md",
                  f"figures/{NAME}/max_context.png"]


rule all:
    input:
        # a multi-GPU sweep (kind: distributed): its points and their report only; a max-context sweep (a
        # `max_context` section): its table and figure; else the step sweep
        [f"results/{NAME}/dist.csv", f"results/{NAME}/dist_summary.md"] if DISTRIBUTED else
        MAXCTX_OUTPUTS if SEARCHES else STEP_OUTPUTS,
        [f"results/{NAME}/kernels/summary.md"] if KERNELS and not DISTRIBUTED else [],
