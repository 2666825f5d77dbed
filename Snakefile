# LeMo benchmark workflow: sweep -> one JSON record per point -> aggregate CSV -> figures; and the
# accuracy experiment (corpus -> pretraining -> predictors -> fine-tuning per method -> perplexity).
#
#   snakemake --cores all                                   # the sweep for the hardware present
#   snakemake --cores all --workflow-profile workflows/profiles/h200   # pick a profile explicitly
#
# The sweep file (workflows/sweeps/*.yaml) defines models, methods, backends and contexts; without
# config `sweep=...` the cpu sweep runs on machines without a GPU and the h200 sweep on a GPU.
# Multi-GPU points (workflows/sweeps/h200-multigpu.yaml) run one torchrun per point; on a Slurm cluster:
#   snakemake --workflow-profile workflows/profiles/slurm

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
