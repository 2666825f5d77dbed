# Accuracy: offline corpus -> pretrained small Llama -> predictors -> context-extension fine-tuning per
# method -> perplexity / passkey -> table and figures. Checkpoints stay under data/ (not committed);
# results/accuracy/NAME holds what was measured and how the checkpoint was made (pretrain.json).

ACC_DATA = f"data/accuracy/{ACCURACY}"
ACC_RESULTS = f"results/accuracy/{ACCURACY}"
# With accuracy_model=DIR the checkpoint is used as given (no pretraining) and its tokenizer.json
# tokenizes the corpus; accuracy_corpus=PATH replaces the built-in documents.
MODEL_DIR = ACC_MODEL or f"{ACC_DATA}/model"
CORPUS_DIR = f"{ACC_DATA}/corpus"
CORPUS_ARGS = (f" --source {ACC_SOURCE}" if ACC_SOURCE else "") + (
    f" --tokenizer {ACC_MODEL}/tokenizer.json" if ACC_MODEL else "")


rule corpus:
    output:
        directory(CORPUS_DIR),
    log:
        f"{ACC_RESULTS}/logs/corpus.log",
    shell:
        "{PY} -m lemo corpus --experiment {ACCURACY_FILE} --out {output} --cache data/debian{CORPUS_ARGS} > {log} 2>&1"


rule pretrain:
    input:
        corpus=CORPUS_DIR,
    output:
        directory(f"{ACC_DATA}/model"),
    log:
        f"{ACC_RESULTS}/logs/pretrain.log",
    resources:
        gpu=1,
    shell:
        "{PY} -m lemo pretrain --experiment {ACCURACY_FILE} --corpus {input.corpus} --out {output} > {log} 2>&1 && "
        "mkdir -p {ACC_RESULTS}/runs/pretrain && cp {output}/pretrain.json {output}/pretrain_log.csv "
        "{ACC_RESULTS}/runs/pretrain/ && cp {input.corpus}/stats.json {ACC_RESULTS}/corpus_stats.json"


rule eval_base:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_DIR,
    output:
        f"{ACC_RESULTS}/runs/pretrained/eval.json",
        f"{ACC_RESULTS}/runs/pretrained+PI/eval.json",
    log:
        f"{ACC_RESULTS}/logs/eval_base.log",
    resources:
        gpu=1,
    shell:
        "{PY} -m lemo eval-base --experiment {ACCURACY_FILE} --model {input.model} --corpus {input.corpus} "
        "--out {ACC_RESULTS}/runs > {log} 2>&1"


rule finetune:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_DIR,
        predictors=lambda w: [f"{ACC_DATA}/predictors"] if w.label in ACC_NEEDS_PREDICTORS else [],
    output:
        f"{ACC_RESULTS}/runs/{{label}}/eval.json",
        f"{ACC_RESULTS}/runs/{{label}}/loss.csv",
    wildcard_constraints:
        label="|".join(re.escape(m) for m in ACCURACY_METHODS),
    params:
        predictors=lambda w, input: f"--predictors {input.predictors}" if input.predictors else "",
    log:
        f"{ACC_RESULTS}/logs/finetune_{{label}}.log",
    resources:
        gpu=1,
    shell:
        "{PY} -m lemo finetune --experiment {ACCURACY_FILE} --model {input.model} --corpus {input.corpus} "
        "{params.predictors} --out {ACC_RESULTS}/runs --methods {wildcards.label} --save-trained {ACC_DATA}/trained "
        "> {log} 2>&1"


rule accuracy_report:
    input:
        expand(f"{ACC_RESULTS}/runs/{{label}}/eval.json", label=ACCURACY_METHODS + ["pretrained", "pretrained+PI"]),
        f"{ACC_RESULTS}/predictors/recall.csv",
    output:
        f"{ACC_RESULTS}/accuracy.csv",
        f"{ACC_RESULTS}/summary.md",
        f"figures/accuracy/{ACCURACY}/perplexity.png",
    log:
        f"{ACC_RESULTS}/logs/report.log",
    shell:
        "{PY} -m lemo accuracy-report {ACC_RESULTS}/runs --out {ACC_RESULTS} --figures figures/accuracy/{ACCURACY} "
        "> {log} 2>&1"
