# Quality on a real pretrained model (an experiment with `model:`, e.g. workflows/accuracy/smollm2.yaml):
# the package's weights -> checkpoint; a corpus tokenized with its tokenizer; the fidelity screen of the
# LeMo variants; predictors and their recall (workflows/rules/predictors.smk, with a `predictors`
# section); each method's context-extension run per seed; the base model's evaluation; the report
# with the frontier (memory of the same labels from the committed h200-frontier sweep).

ACC_DATA = f"data/accuracy/{ACCURACY}"
ACC_RESULTS = f"results/accuracy/{ACCURACY}"
MODEL_DIR = ACC_MODEL or f"data/models/{ACC_PRETRAINED}"
CORPUS_DIR = f"{ACC_DATA}/corpus"
FIDELITY_FACTORS = sorted((_acc.get("fidelity") or {}).get("rope_factors", {}))
FRONTIER_SWEEP = "results/h200-frontier/sweep.csv"


rule fetch_model:
    output:
        directory(f"data/models/{ACC_PRETRAINED}"),
    log:
        f"{ACC_RESULTS}/logs/fetch_model.log",
    params:
        name=ACC_PRETRAINED,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo fetch-model {params.name} --out {output} > {log} 2>&1"


rule corpus:
    input:
        model=MODEL_DIR,
    output:
        directory(CORPUS_DIR),
    log:
        f"{ACC_RESULTS}/logs/corpus.log",
    params:
        experiment=ACCURACY_FILE,
        source=f"--source {ACC_SOURCE}" if ACC_SOURCE else "",
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo corpus --experiment {params.experiment} --out {output} --cache data/debian {params.source} "
        "--tokenizer {input.model}/tokenizer.json > {log} 2>&1"


rule fidelity:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_DIR,
    output:
        expand(f"{ACC_RESULTS}/fidelity/fidelity_x{{factor}}.csv", factor=FIDELITY_FACTORS),
    log:
        f"{ACC_RESULTS}/logs/fidelity.log",
    params:
        experiment=ACCURACY_FILE,
        out=lambda w, output: str(Path(output[0]).parent),
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo fidelity --experiment {params.experiment} --model {input.model} --corpus {input.corpus} "
        "--out {params.out} > {log} 2>&1"


rule finetune_seeded:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_DIR,
        predictors=lambda w: [f"{ACC_DATA}/predictors"] if w.label in ACC_NEEDS_PREDICTORS else [],
    output:
        eval=f"{ACC_RESULTS}/runs/{{label}}.s{{seed}}/eval.json",
        loss=f"{ACC_RESULTS}/runs/{{label}}.s{{seed}}/loss.csv",
    wildcard_constraints:
        label="|".join(re.escape(m) for m in ACCURACY_METHODS),
        seed=r"\d+",
    log:
        f"{ACC_RESULTS}/logs/finetune_{{label}}.s{{seed}}.log",
    params:
        experiment=ACCURACY_FILE,
        runs=lambda w, output: str(Path(output.eval).parent.parent),
        predictors=lambda w, input: f"--predictors {input.predictors}" if input.predictors else "",
    benchmark:
        f"logs/benchmarks/accuracy/{ACCURACY}/finetune_{{label}}.s{{seed}}.tsv"  # wall time, peak RSS (not committed)
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo finetune --experiment {params.experiment} --model {input.model} --corpus {input.corpus} "
        "{params.predictors} --out {params.runs} --methods {wildcards.label} --seeds {wildcards.seed} > {log} 2>&1"


rule eval_base:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_DIR,
    output:
        base=f"{ACC_RESULTS}/runs/pretrained/eval.json",
        pi=f"{ACC_RESULTS}/runs/pretrained+PI/eval.json",
    log:
        f"{ACC_RESULTS}/logs/eval_base.log",
    params:
        experiment=ACCURACY_FILE,
        runs=lambda w, output: str(Path(output.base).parent.parent),
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo eval-base --experiment {params.experiment} --model {input.model} --corpus {input.corpus} "
        "--out {params.runs} > {log} 2>&1"


rule quality_report:
    input:
        runs=expand(f"{ACC_RESULTS}/runs/{{label}}.s{{seed}}/eval.json", label=ACCURACY_METHODS, seed=ACC_SEEDS),
        base=f"{ACC_RESULTS}/runs/pretrained/eval.json",
        fidelity=expand(f"{ACC_RESULTS}/fidelity/fidelity_x{{factor}}.csv", factor=FIDELITY_FACTORS),
        recall=[f"{ACC_RESULTS}/predictors/recall.csv"] if ACC_PRED else [],
    output:
        csv=f"{ACC_RESULTS}/accuracy.csv",
        frontier=f"{ACC_RESULTS}/frontier.csv",
        summary=f"{ACC_RESULTS}/summary.md",
    log:
        f"{ACC_RESULTS}/logs/report.log",
    params:
        runs=lambda w, input: str(Path(input.runs[0]).parent.parent),
        fidelity=lambda w, output: str(Path(output.summary).parent / "fidelity"),  # rule fidelity's CSVs, if any
        sweep=f"--sweep {FRONTIER_SWEEP}" if Path(FRONTIER_SWEEP).exists() else "",
        figures=f"figures/accuracy/{ACCURACY}",
        out=lambda w, output: str(Path(output.summary).parent),
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo quality-report {params.runs} --fidelity {params.fidelity} {params.sweep} --out {params.out} "
        "--figures {params.figures} --paper results/reference/jenga_ae_a800.csv > {log} 2>&1"
