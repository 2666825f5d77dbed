# Multi-GPU points (`kind: distributed` sweep files): one torchrun launch per point, resources gpu=N and
# no `tasks` (under the Slurm executor one task runs torchrun, which starts the N processes). A launch
# that fails (e.g. out of memory on some rank) still leaves a record saying so, read from its log.
# torchrun and python come from the rule's software environment (workflows/rules/common.smk).
from lemo.distributed.points import dist_points

DIST_POINTS = {p.id: p for p in dist_points(SWEEP)} if DISTRIBUTED else {}


rule dist_point:
    output:
        "results/{name}/dist/{point}.json",
    log:
        "results/{name}/logs/dist/{point}.log",
    wildcard_constraints:
        point="[A-Za-z0-9_.-]+",
    params:
        sweep=SWEEP_FILE,
    benchmark:
        "logs/benchmarks/{name}/dist/{point}.tsv"  # wall time and peak RSS of the launch (logs/: not committed)
    threads: lambda w: 8 * DIST_POINTS[w.point].gpus
    resources:
        gpu=lambda w: DIST_POINTS[w.point].gpus,
    conda:
        "../../environment.yml"
    shell:
        "torchrun --standalone --nproc-per-node {resources.gpu} -m lemo dist-bench --sweep {params.sweep} "
        "--point {wildcards.point} --out {output} > {log} 2>&1 || "
        "python -m lemo dist-bench --sweep {params.sweep} --point {wildcards.point} --out {output} "
        "--record-failure {log} >> {log} 2>&1"


rule dist_report:
    input:
        expand("results/{{name}}/dist/{point}.json", point=sorted(DIST_POINTS)),
    output:
        csv="results/{name}/dist.csv",
        md="results/{name}/dist_summary.md",
    log:
        "results/{name}/logs/dist_report.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo dist-report results/{wildcards.name}/dist --out {output.csv} --md {output.md} > {log} 2>&1"
