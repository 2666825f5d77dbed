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
    shell:
        "{PY} -m lemo fetch-model {params.name} --out {output} > {log} 2>&1"


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
    shell:
        "{PY} -m lemo corpus --experiment {params.experiment} --out {output} --cache data/debian {params.source} "
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
        out=f"{ACC_RESULTS}/fidelity",
    resources:
        gpu=1,
    shell:
        "{PY} -m lemo fidelity --experiment {params.experiment} --model {input.model} --corpus {input.corpus} "
        "--out {params.out} > {log} 2>&1"


rule finetune_seeded:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_DIR,
        predictors=lambda w: [f"{ACC_DATA}/predictors"] if w.label in ACC_NEEDS_PREDICTORS else [],
    output:
        f"{ACC_RESULTS}/runs/{{label}}.s{{seed}}/eval.json",
        f"{ACC_RESULTS}/runs/{{label}}.s{{seed}}/loss.csv",
    wildcard_constraints:
        label="|".join(re.escape(m) for m in ACCURACY_METHODS),
        seed=r"\d+",
    log:
        f"{ACC_RESULTS}/logs/finetune_{{label}}.s{{seed}}.log",
    params:
        experiment=ACCURACY_FILE,
        runs=f"{ACC_RESULTS}/runs",
        predictors=lambda w, input: f"--predictors {input.predictors}" if input.predictors else "",
    resources:
        gpu=1,
    shell:
        "{PY} -m lemo finetune --experiment {params.experiment} --model {input.model} --corpus {input.corpus} "
        "{params.predictors} --out {params.runs} --methods {wildcards.label} --seeds {wildcards.seed} > {log} 2>&1"


rule eval_base:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_DIR,
    output:
        f"{ACC_RESULTS}/runs/pretrained/eval.json",
        f"{ACC_RESULTS}/runs/pretrained+PI/eval.json",
    log:
        f"{ACC_RESULTS}/logs/eval_base.log",
    params:
        experiment=ACCURACY_FILE,
        runs=f"{ACC_RESULTS}/runs",
    resources:
        gpu=1,
    shell:
        "{PY} -m lemo eval-base --experiment {params.experiment} --model {input.model} --corpus {input.corpus} "
        "--out {params.runs} > {log} 2>&1"


rule quality_report:
    input:
        runs=expand(f"{ACC_RESULTS}/runs/{{label}}.s{{seed}}/eval.json", label=ACCURACY_METHODS, seed=ACC_SEEDS),
        base=f"{ACC_RESULTS}/runs/pretrained/eval.json",
        fidelity=expand(f"{ACC_RESULTS}/fidelity/fidelity_x{{factor}}.csv", factor=FIDELITY_FACTORS),
        recall=[f"{ACC_RESULTS}/predictors/recall.csv"] if ACC_PRED else [],
    output:
        f"{ACC_RESULTS}/accuracy.csv",
        f"{ACC_RESULTS}/frontier.csv",
        f"{ACC_RESULTS}/summary.md",
    log:
        f"{ACC_RESULTS}/logs/report.log",
    params:
        runs=f"{ACC_RESULTS}/runs",
        fidelity=f"{ACC_RESULTS}/fidelity",
        sweep=f"--sweep {FRONTIER_SWEEP}" if Path(FRONTIER_SWEEP).exists() else "",
        figures=f"figures/accuracy/{ACCURACY}",
        out=ACC_RESULTS,
    shell:
        "{PY} -m lemo quality-report {params.runs} --fidelity {params.fidelity} {params.sweep} --out {params.out} "
        "--figures {params.figures} --paper results/reference/jenga_ae_a800.csv > {log} 2>&1"
