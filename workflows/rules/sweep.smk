rule measure:
    """One job = one model at one checkpointing setting: every backend, context and method in it."""
    output:
        directory("results/{name}/records/{job}"),
    log:
        "results/{name}/logs/records/{job}.log",
    params:
        sweep=SWEEP_FILE,
    threads: workflow.cores  # timed jobs never share the machine
    resources:
        gpu=1,
    shell:
        "{PY} -m lemo measure --sweep {params.sweep} --job {wildcards.job} --out {output} > {log} 2>&1"


rule aggregate:
    input:
        expand("results/{{name}}/records/{job}", job=sorted(JOBS)),
    output:
        "results/{name}/sweep.csv",
    log:
        "results/{name}/logs/sweep.log",
    shell:
        "{PY} -m lemo aggregate {input} --out {output} > {log} 2>&1"


rule figures:
    input:
        csv="results/{name}/sweep.csv",
        reference="results/reference/jenga_ae_a800.csv",
    output:
        expand("figures/{{name}}/{model}.png", model=MODELS),
    log:
        "results/{name}/logs/figures.log",
    shell:
        "{PY} -m lemo figures {input.csv} --reference {input.reference} --out-dir figures/{wildcards.name} > {log} 2>&1"


rule report:
    input:
        csv="results/{name}/sweep.csv",
        paper="results/reference/jenga_ae_a800.csv",
        probe="results/reference/h200_lora_baseline.csv",
    output:
        "results/{name}/summary.md",
    log:
        "results/{name}/logs/summary.log",
    shell:
        "{PY} -m lemo report {input.csv} --reference-dir results/reference --out {output} > {log} 2>&1"
