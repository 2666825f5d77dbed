# Accuracy: offline corpus -> pretrained small Llama -> predictors -> context-extension fine-tuning per
# method -> perplexity / passkey -> table and figures. Checkpoints stay under data/ (not committed);
# results/accuracy/NAME holds what was measured and how the checkpoint was made (pretrain.json).
from pathlib import Path

ACC_DATA = f"data/accuracy/{ACCURACY}"
ACC_RESULTS = f"results/accuracy/{ACCURACY}"
# With accuracy_model=DIR the checkpoint is used as given (no pretraining) and its tokenizer.json
# tokenizes the corpus; accuracy_corpus=PATH replaces the built-in documents.
MODEL_DIR = ACC_MODEL or f"{ACC_DATA}/model"
CORPUS_DIR = f"{ACC_DATA}/corpus"


rule corpus:
    output:
        directory(CORPUS_DIR),
    log:
        f"{ACC_RESULTS}/logs/corpus.log",
    params:
        experiment=ACCURACY_FILE,
        source=f"--source {ACC_SOURCE}" if ACC_SOURCE else "",
        tokenizer=f"--tokenizer {ACC_MODEL}/tokenizer.json" if ACC_MODEL else "",
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo corpus --experiment {params.experiment} --out {output} --cache data/debian {params.source} "
        "{params.tokenizer} > {log} 2>&1"


rule pretrain:
    input:
        corpus=CORPUS_DIR,
    output:
        directory(f"{ACC_DATA}/model"),
    log:
        f"{ACC_RESULTS}/logs/pretrain.log",
    params:
        experiment=ACCURACY_FILE,
        runs=f"{ACC_RESULTS}/runs/pretrain",  # copies of the checkpoint's pretrain.json and loss curve
        results=ACC_RESULTS,  # corpus_stats.json
    benchmark:
        f"logs/benchmarks/accuracy/{ACCURACY}/pretrain.tsv"  # wall time and peak RSS (logs/: not committed)
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo pretrain --experiment {params.experiment} --corpus {input.corpus} --out {output} > {log} 2>&1 && "
        "mkdir -p {params.runs} && cp {output}/pretrain.json {output}/pretrain_log.csv "
        "{params.runs}/ && cp {input.corpus}/stats.json {params.results}/corpus_stats.json"


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


rule finetune:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_DIR,
        predictors=lambda w: [f"{ACC_DATA}/predictors"] if w.label in ACC_NEEDS_PREDICTORS else [],
    output:
        eval=f"{ACC_RESULTS}/runs/{{label}}/eval.json",
        loss=f"{ACC_RESULTS}/runs/{{label}}/loss.csv",
    wildcard_constraints:
        label="|".join(re.escape(m) for m in ACCURACY_METHODS),
    params:
        experiment=ACCURACY_FILE,
        predictors=lambda w, input: f"--predictors {input.predictors}" if input.predictors else "",
        runs=lambda w, output: str(Path(output.eval).parent.parent),
        trained=f"{ACC_DATA}/trained",
    log:
        f"{ACC_RESULTS}/logs/finetune_{{label}}.log",
    benchmark:
        f"logs/benchmarks/accuracy/{ACCURACY}/finetune_{{label}}.tsv"  # wall time and peak RSS (logs/: not committed)
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo finetune --experiment {params.experiment} --model {input.model} --corpus {input.corpus} "
        "{params.predictors} --out {params.runs} --methods {wildcards.label} --save-trained {params.trained} "
        "> {log} 2>&1"


rule accuracy_report:
    input:
        runs=expand(f"{ACC_RESULTS}/runs/{{label}}/eval.json", label=ACCURACY_METHODS + ["pretrained", "pretrained+PI"]),
        recall=f"{ACC_RESULTS}/predictors/recall.csv",
    output:
        csv=f"{ACC_RESULTS}/accuracy.csv",
        summary=f"{ACC_RESULTS}/summary.md",
        figure=f"figures/accuracy/{ACCURACY}/perplexity.png",
    log:
        f"{ACC_RESULTS}/logs/report.log",
    params:
        runs=lambda w, input: str(Path(input.runs[0]).parent.parent),
        out=lambda w, output: str(Path(output.summary).parent),
        figures=lambda w, output: str(Path(output.figure).parent),
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo accuracy-report {params.runs} --out {params.out} --figures {params.figures} > {log} 2>&1"
