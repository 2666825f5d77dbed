rule measure:
    """One job = one model at one checkpointing setting: every backend, context and method in it.

    The records (results/NAME/records/JOB/*.json, one per point, written as each point finishes) are
    not outputs, so Snakemake never deletes them: a job killed or failed keeps what it measured, and its
    rerun measures only the rest (same commit and GPU). The output is the marker of a finished job."""
    input:
        predictor_inputs,
    output:
        "results/{name}/records/{job}.done",
    log:
        "results/{name}/logs/records/{job}.log",
    params:
        sweep=SWEEP_FILE,
        records=lambda w: f"results/{w.name}/records/{w.job}",
        fresh="--fresh" if FRESH else "",  # --config fresh=1: measure again, keep nothing
    benchmark:
        "logs/benchmarks/{name}/records/{job}.tsv"  # wall time and peak RSS of the whole job (logs/: not committed)
    threads: workflow.cores  # timed jobs never share the machine
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo measure --sweep {params.sweep} --job {wildcards.job} --out {params.records} {params.fresh}"
        " > {log} 2>&1 && touch {output}"


rule aggregate:
    input:
        expand("results/{{name}}/records/{job}.done", job=sorted(JOBS)),
    output:
        "results/{name}/sweep.csv",
    log:
        "results/{name}/logs/sweep.log",
    params:
        records=lambda w, input: [p.removesuffix(".done") for p in input],
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo aggregate {params.records} --out {output} > {log} 2>&1"


rule figures:
    input:
        csv="results/{name}/sweep.csv",
        reference="results/reference/jenga_ae_a800.csv",
    output:
        expand("figures/{{name}}/{model}.png", model=MODELS),
    log:
        "results/{name}/logs/figures.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo figures {input.csv} --reference {input.reference} --out-dir figures/{wildcards.name} > {log} 2>&1"


rule report:
    input:
        csv="results/{name}/sweep.csv",
        paper="results/reference/jenga_ae_a800.csv",
        probe="results/reference/h200_lora_baseline.csv",
    output:
        "results/{name}/summary.md",
    log:
        "results/{name}/logs/summary.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo report {input.csv} --reference-dir results/reference --out {output} > {log} 2>&1"


# Kernel microbenchmarks on the GPU (workflows/scripts/bench_KERNEL.py): one CSV per kernel with
# provenance, then one table + figure set. Only GPU sweeps list them (config `kernels` in the sweep).
KERNELS = SWEEP.get("kernel_benchmarks", [])


rule bench_kernel:
    output:
        "results/{name}/kernels/{kernel}.csv",
    log:
        "results/{name}/logs/kernels/{kernel}.log",
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    # workflows/scripts/bench_KERNEL.py as a module from the repository root: it imports lemo from there in the
    # conda environment too
    shell:
        "python -m workflows.scripts.bench_{wildcards.kernel} {output} > {log} 2>&1"


rule kernel_report:
    input:
        expand("results/{{name}}/kernels/{kernel}.csv", kernel=KERNELS),
    output:
        "results/{name}/kernels/summary.md",
    log:
        "results/{name}/logs/kernels/report.log",
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo kernel-report {input} --out {output} --figures figures/{wildcards.name}/kernels > {log} 2>&1"


rule untrained_predictors:
    """Predictors with initial weights for a registry model with random weights: for cost measurements."""
    output:
        directory("data/predictors/{model}"),
    log:
        "logs/predictors_{model}.log",
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo train-predictors --model {wildcards.model} --steps 0 --out {output} > {log} 2>&1"
