# Max-context searches (sweeps with a `max_context` section, e.g. workflows/sweeps/h200-maxctx.yaml):
# one process per search (its memory cap is per process); a search directory keeps its probe records,
# so a search cut off by a time limit resumes where it stopped when run again.
from pathlib import Path

from lemo.bench.maxctx import searches

SEARCHES = {s.id: s for s in searches(SWEEP)} if "max_context" in SWEEP else {}


rule max_context_search:
    input:
        lambda w: sorted({p for p in [SEARCHES[w.search].point.options.get("lemo", {}).get("predictor_path")] if p}),
    output:
        "results/{name}/maxctx/{search}/result.json",
    log:
        "results/{name}/logs/maxctx/{search}.log",
    params:
        sweep=SWEEP_FILE,
    benchmark:
        "logs/benchmarks/{name}/maxctx/{search}.tsv"  # wall time and peak RSS of the search (logs/: not committed)
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo max-context --sweep {params.sweep} --search {wildcards.search} "
        "--out results/{wildcards.name}/maxctx/{wildcards.search} > {log} 2>&1"


rule max_context_report:
    input:
        expand("results/{{name}}/maxctx/{search}/result.json", search=sorted(SEARCHES)),
    output:
        csv="results/{name}/max_context.csv",
        table="results/{name}/max_context.md",
        figure="figures/{name}/max_context.png",
    log:
        "results/{name}/logs/max_context_report.log",
    params:
        dirs=lambda w, input: " ".join(str(Path(f).parent) for f in input),
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo max-context-report {params.dirs} --csv {output.csv} --figure {output.figure} "
        "--out {output.table} > {log} 2>&1"
