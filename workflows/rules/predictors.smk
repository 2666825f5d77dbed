# Block predictors of the experiment's model (the pretrained small Llama, or a real model such as
# SmolLM2): trained against the oracle at the fine-tuning context, then their recall of the oracle's
# kept blocks on held-out windows, with thresholds tuned to the experiment's target recall.
# Needs MODEL_DIR, CORPUS_DIR, ACC_DATA, ACC_RESULTS from accuracy.smk or quality.smk.

PRED_LAYERS = ",".join(str(i) for i in ACC_PRED.get("sparse_layers") or [])


rule train_predictors:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_DIR,
    output:
        directory(f"{ACC_DATA}/predictors"),
    log:
        f"{ACC_RESULTS}/logs/train_predictors.log",
    params:
        rope=ACC_ROPE,
        context=ACC_PRED.get("context"),
        steps=ACC_PRED.get("steps"),
        batch=ACC_PRED.get("batch"),
        layers=f"--sparse-layers {PRED_LAYERS}" if PRED_LAYERS else "",
    benchmark:
        f"logs/benchmarks/accuracy/{ACCURACY}/train_predictors.tsv"  # wall time and peak RSS (logs/: not committed)
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo train-predictors --model {input.model} --corpus {input.corpus} --out {output} "
        "--rope-factor {params.rope} --context {params.context} --steps {params.steps} --batch {params.batch} "
        "{params.layers} > {log} 2>&1"


rule eval_predictors:
    input:
        model=MODEL_DIR,
        corpus=CORPUS_DIR,
        predictors=f"{ACC_DATA}/predictors",
    output:
        f"{ACC_RESULTS}/predictors/recall.csv",
    log:
        f"{ACC_RESULTS}/logs/eval_predictors.log",
    params:
        rope=ACC_ROPE,
        context=ACC_PRED.get("context"),
        batch=ACC_PRED.get("batch"),
        recall=ACC_PRED.get("target_recall", 0.95),
        out=lambda w, output: str(Path(output[0]).parent),  # the predictors' thresholds and options are copied there
    resources:
        gpu=1,
    conda:
        "../../environment.yml"
    shell:
        "python -m lemo eval-predictors --model {input.model} --corpus {input.corpus} --predictors {input.predictors} "
        "--rope-factor {params.rope} --context {params.context} --batch {params.batch} --batches 8 "
        "--target-recall {params.recall} --out {output} --tune-thresholds > {log} 2>&1 && "
        "cp {input.predictors}/*.json {params.out}/"
