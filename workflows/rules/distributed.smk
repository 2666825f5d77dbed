# Multi-GPU points (`kind: distributed` sweep files): one torchrun launch per point, resources gpu=N and
# no `tasks` (under the Slurm executor one task runs torchrun, which starts the N processes). A launch
# that fails (e.g. out of memory on some rank) still leaves a record saying so, read from its log.
from pathlib import Path

from lemo.distributed.points import dist_points

DIST_POINTS = {p.id: p for p in dist_points(SWEEP)} if DISTRIBUTED else {}
TORCHRUN = str(Path(PY).with_name("torchrun"))  # the torchrun of the interpreter running snakemake


rule dist_point:
    output:
        "results/{name}/dist/{point}.json",
    log:
        "results/{name}/logs/dist/{point}.log",
    wildcard_constraints:
        point="[A-Za-z0-9_.-]+",
    params:
        sweep=SWEEP_FILE,
    threads: lambda w: 8 * DIST_POINTS[w.point].gpus
    resources:
        gpu=lambda w: DIST_POINTS[w.point].gpus,
    shell:
        "{TORCHRUN} --standalone --nproc-per-node {resources.gpu} -m lemo dist-bench --sweep {params.sweep} "
        "--point {wildcards.point} --out {output} > {log} 2>&1 || "
        "{PY} -m lemo dist-bench --sweep {params.sweep} --point {wildcards.point} --out {output} "
        "--record-failure {log} >> {log} 2>&1"


rule dist_report:
    input:
        expand("results/{{name}}/dist/{point}.json", point=sorted(DIST_POINTS)),
    output:
        csv="results/{name}/dist.csv",
        md="results/{name}/dist_summary.md",
    log:
        "results/{name}/logs/dist_report.log",
    shell:
        "{PY} -m lemo dist-report results/{wildcards.name}/dist --out {output.csv} --md {output.md} > {log} 2>&1"
