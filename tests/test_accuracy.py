"""The accuracy workflow's pieces: corpus split, perplexity, passkey prompts, experiment files."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from lemo.accuracy.corpus import Document, local_documents, prepare_corpus, sample_windows, split_documents
from lemo.accuracy.experiment import load_experiment
from lemo.accuracy.passkey import make_sample
from lemo.accuracy.perplexity import perplexity, windows
from lemo.models.registry import build_model

ROOT = Path(__file__).resolve().parent.parent


def _docs(n=200):
    return [Document(f"src/doc{i}", ("word%d " % i) * (50 + 3000 * (i % 7 == 0))) for i in range(n)]


def test_split_is_deterministic_disjoint_and_holds_long_documents():
    docs = _docs()
    a, b = (
        split_documents(docs, 0.1, seed=3, min_long=4, long_chars=10_000),
        split_documents(docs, 0.1, seed=3, min_long=4, long_chars=10_000),
    )
    names = lambda s: [d.name for d in s]  # noqa: E731
    assert names(a["train"]) == names(b["train"]) and names(a["heldout"]) == names(b["heldout"])
    assert not set(names(a["train"])) & set(names(a["heldout"]))
    assert len(a["train"]) + len(a["heldout"]) == len(docs)
    assert sum(len(d.text) >= 10_000 for d in a["heldout"]) >= 4
    c = split_documents(docs, 0.1, seed=4, min_long=4, long_chars=10_000)
    assert names(c["heldout"]) != names(a["heldout"])  # the seed matters


def test_split_rejects_duplicate_names():
    with pytest.raises(ValueError, match="unique"):
        split_documents([Document("a", "x"), Document("a", "y")])


def test_prepare_local_corpus_round_trip(tmp_path):
    src = tmp_path / "texts"
    src.mkdir()
    for i in range(30):
        (src / f"t{i}.txt").write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * (20 + i))
    stats = prepare_corpus(tmp_path / "c", source=src, vocab_size=300, heldout_fraction=0.2, min_long=2)
    assert stats["train"]["documents"] + stats["heldout"]["documents"] == 30
    assert stats["heldout"]["documents"] >= 2
    w = sample_windows(tmp_path / "c", "train", 64, 5, seed=1)
    assert w.shape == (5, 64) and w.dtype == torch.int64 and int(w.max()) < stats["vocab_size"]
    assert torch.equal(w, sample_windows(tmp_path / "c", "train", 64, 5, seed=1))


def test_local_documents_rejects_unknown_input(tmp_path):
    with pytest.raises(ValueError, match="directory of .txt"):
        local_documents(tmp_path)


def test_perplexity_equals_direct_computation():
    model = build_model("llama2-tiny", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 512, (n,), generator=gen).numpy() for n in (300, 257, 100)]
    got = perplexity(model, docs, context=64, tokens_per_doc=256, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs[:2]:  # the 100-token document is too short for 256 tokens
            for s in range(0, 256, 64):
                ids = torch.from_numpy(d[s : s + 64].astype(np.int64))[None]
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
                total -= logp.gather(1, ids[0, 1:, None]).sum().item()
                count += 63
    assert got["tokens"] == count and got["windows"] == 8
    assert math.isclose(got["nll"], total / count, rel_tol=1e-5)
    assert math.isclose(got["ppl"], math.exp(total / count), rel_tol=1e-5)


def test_every_context_scores_the_same_tokens():
    model = build_model("llama2-tiny", dtype=torch.float32)
    docs = [torch.randint(0, 512, (256,)).numpy() for _ in range(2)]
    runs = [perplexity(model, docs, c, 256, unscored_every=32) for c in (32, 64, 256)]
    assert len({r["tokens"] for r in runs}) == 1 and runs[0]["tokens"] == 2 * (256 - 8)
    plain = [perplexity(model, docs, c, 256) for c in (32, 256)]
    assert plain[0]["tokens"] != plain[1]["tokens"]  # without it, longer windows score more tokens
    # the tokens a 32-token window cannot predict are the ones left out at 256: same NLL at 256 otherwise
    ids = torch.from_numpy(np.stack(docs).astype(np.int64))
    with torch.no_grad():
        nll = F.cross_entropy(
            model(input_ids=ids).logits[:, :-1].transpose(1, 2).double(), ids[:, 1:], reduction="none"
        )
    keep = torch.arange(1, 256) % 32 != 0
    assert math.isclose(runs[2]["nll"], nll[:, keep].mean().item(), rel_tol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        perplexity(model, docs, 48, 96, unscored_every=32)


def test_windows_need_a_multiple_of_the_context():
    with pytest.raises(ValueError, match="multiple"):
        windows([np.zeros(100, dtype=np.int64)], 64, 100)


class _CharTokenizer:
    """One token per character, so positions are easy to check."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

        def char_to_token(self, i):
            return i

    def encode(self, s, add_special_tokens=True):
        return self._Enc(([1] if add_special_tokens else []) + [ord(c) for c in s])

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_places_the_key_where_it_says(depth):
    tok = _CharTokenizer()
    s = make_sample(tok, 4000, depth, key=48213)
    assert len(s.ids) <= 4000
    assert tok.decode(s.ids[s.key_start : s.key_end]).startswith("The pass key is 48213.")
    assert tok.decode(s.ids[s.answer_start :]) == " 48213"
    assert tok.decode(s.ids[: s.answer_start]).endswith("What is the pass key? The pass key is")
    frac = s.key_start / s.answer_start
    assert abs(frac - depth) < 0.05  # the key sits at the requested depth of the prompt
    assert 1 not in s.ids  # no BOS inside the prompt


def test_passkey_prompt_is_tokenized_as_one_text(tmp_path):
    """With a BPE, pieces encoded apart join differently from the text encoded once; a real tokenizer
    that adds BOS must not put one before every piece."""
    from lemo.accuracy.corpus import train_tokenizer

    tok = train_tokenizer(
        [
            Document(f"d{i}", f"The grass is green. The sky is blue. There and back again. The pass key is {i}. " * 20)
            for i in range(30)
        ],
        400,
    )
    s = make_sample(tok, 600, 0.5, key=48213)
    assert s.ids == tok.encode(tok.decode(s.ids), add_special_tokens=False).ids
    assert tok.decode(s.ids[s.answer_start :]).strip() == "48213"
    assert "The pass key is 48213." in tok.decode(s.ids[s.key_start : s.key_end])
    assert len(s.ids) <= 600
    with pytest.raises(ValueError, match="depth"):
        make_sample(tok, 4000, 1.5, key=1)


@pytest.mark.parametrize("name", ["small", "ci"])
def test_experiment_files_load(name):
    exp = load_experiment(ROOT / "workflows" / "accuracy" / f"{name}.yaml")
    assert {"lora", "longlora", "lemo-token", "lemo-channel", "lemo-predictor"} <= set(exp.methods)
    assert exp.finetune.context == exp.pretrain.context * exp.finetune.rope_factor
    with pytest.raises(ValueError, match="--predictors"):
        exp.method_options("lemo-predictor")
    assert exp.method_options("lemo-predictor", Path("/p"))["lemo"]["predictor_path"] == "/p"


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d.update(finetun={}), r"unknown sections \['finetun'\]"),
        (lambda d: d["corpus"].update(vocab=10), "corpus: unknown key 'vocab'"),
        (lambda d: d["corpus"].update(heldout_fraction="0.1"), "corpus: heldout_fraction must be a number"),
        (lambda d: d["predictors"].update(steps=1.5), "predictors: steps must be an integer"),
        (lambda d: d["pretrain"].update(lr="1e-3"), r"pretrain: PretrainConfig: lr must be a number, got '1e-3'"),
        (lambda d: d["finetune"].update(step=3), r"finetune: unknown fields \['step'\]"),
        (lambda d: d["finetune"].update(gradient_checkpointing="no"), "gradient_checkpointing must be true or false"),
        (lambda d: d["methods"]["lemo-token"]["lemo"].update(mlp_mode="tokn"), "method 'lemo-token': mlp_mode"),
        (lambda d: d["methods"]["lora"]["lora"].update(target="qv"), r"method 'lora': lora options: unknown fields"),
        (lambda d: d.pop("methods"), r"missing sections \['methods'\]"),
    ],
)
def test_bad_experiment_files_fail_at_load_naming_file_and_key(tmp_path, change, words):
    data = yaml.safe_load((ROOT / "workflows/accuracy/ci.yaml").read_text())
    change(data)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=words) as err:
        load_experiment(path)
    assert str(path) in str(err.value)


def test_real_checkpoint_path_end_to_end(tmp_path):
    """A saved Hugging Face checkpoint + a local text directory go through corpus, fine-tuning, evaluation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lemo.accuracy.corpus import train_tokenizer
    from lemo.bench.cli import main

    src = tmp_path / "texts"
    src.mkdir()
    for i in range(24):
        (src / f"t{i}.txt").write_text(
            f"Chapter {i}. " + "In the beginning was the word, and the word was long. " * (40 + 10 * i)
        )
    tok = train_tokenizer(local_documents(src), 300)
    ckpt = tmp_path / "ckpt"
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(cfg).save_pretrained(ckpt)
    tok.save(str(ckpt / "tokenizer.json"))
    exp = ROOT / "workflows" / "accuracy" / "ci.yaml"
    assert (
        main(
            [
                "corpus",
                "--out",
                str(tmp_path / "corpus"),
                "--source",
                str(src),
                "--tokenizer",
                str(ckpt / "tokenizer.json"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "finetune",
                "--experiment",
                str(exp),
                "--model",
                str(ckpt),
                "--corpus",
                str(tmp_path / "corpus"),
                "--out",
                str(tmp_path / "runs"),
                "--methods",
                "lora",
                "lemo-token",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    import json

    rows = json.loads((tmp_path / "runs" / "lemo-token" / "eval.json").read_text())
    ppl = [r for r in rows if r["metric"] == "perplexity"]
    assert [r["context"] for r in ppl] == [128, 512] and all(math.isfinite(r["value"]) for r in ppl)
    assert (tmp_path / "runs" / "lora" / "loss.csv").exists()


def test_accuracy_report_relative_perplexity(tmp_path):
    import json

    from lemo.accuracy.report import write_report

    runs = tmp_path / "runs"
    base = {
        "method": "x",
        "finetune_config": json.dumps(
            {
                "rope_factor": 8,
                "context": 8192,
                "steps": 1,
                "batch_size": 1,
                "lr": 1e-3,
                "seed": 0,
                "eval_tokens_per_doc": 16384,
            }
        ),
        "train_seconds": 1.0,
        "train_peak_gib": 1.0,
        "final_loss": 2.0,
        "gpu": "G",
        "git_commit": "abc",
    }
    for label, ppl in (("lora", 10.0), ("lemo-token", 11.0)):
        (runs / label).mkdir(parents=True)
        rows = [
            {
                **base,
                "label": label,
                "metric": "perplexity",
                "context": c,
                "value": ppl * (c / 1024) ** 0.01,
                "documents": 3,
                "tokens": 500,
            }
            for c in (1024, 8192)
        ]
        rows.append(
            {**base, "label": label, "metric": "passkey", "context": 1024, "value": 0.5, "token_accuracy": 0.75}
        )
        (runs / label / "eval.json").write_text(json.dumps(rows))
    paths = write_report(runs, tmp_path / "out", tmp_path / "fig")
    text = re.sub(r" +", " ", (tmp_path / "out" / "summary.md").read_text())  # tables padded by tabulate
    assert "| lemo-token | 11.000 (+10.0%) |" in text and "| lora | 10.000 |" in text
    assert "the same 500 scored tokens at every context" in text
    assert "0.50 (0.75)" in text and (tmp_path / "fig" / "perplexity.png") in paths
