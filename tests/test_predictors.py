"""Pattern prediction (lemo.predictors): predicted maps, oracle agreement, training, elastic size, storage,
the predictor scorer inside apply_lemo, threshold tuning and the CLI. CPU, tiny models."""

import json
import math

import pytest
import torch
from torch import nn

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo.bench.cli import main as cli_main
from lemo.kernels.block_scores import block_scores_reference
from lemo.layout import TokenLayout, make_layout
from lemo.models.adapters import LayerParts, get_adapter, unwrap
from lemo.models.registry import build_model
from lemo.predictors import (
    LayerPredictor,
    PredictorScorer,
    PredictorSet,
    build_predictors,
    collect_scores,
    load_scorer,
    recall_rows,
    train_predictors,
    tune_thresholds,
)
from lemo.predictors.blocks import allowed_tiles, head_blocks
from lemo.predictors.elastic import prune_set, rebuild_optimizer
from lemo.scoring import OracleScorer
from lemo.selection import block_valid, select_blocks
from tests.helpers import tiny_lora_model

BS = 16  # block size for the tiny models (L = 256 -> 16 blocks)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matmuls: several threads only add contention (on a loaded 2-core machine, 100x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- a model with content to predict
def _sink_model():
    """llama2-tiny where tokens 0..7 carry keys that every query attends to: which blocks matter depends on
    content, not only on position (a random tiny model's column sums just follow the causal row counts)."""
    model = build_model("llama2-tiny", dtype=torch.float32, seed=0)
    gen = torch.Generator().manual_seed(123)
    u = torch.randn(64, generator=gen)
    u /= u.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight[:8] = u + 0.02 * torch.randn(8, 64, generator=gen)
        e = torch.zeros(64)
        e[7::16] = 1.0  # the slowest RoPE pair of every head: the key direction barely rotates
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.add_(3.0 * torch.outer(e, u))
    return model


def _sink_batches(n, seed, b=2, length=256, heavy_blocks=3, fill=4):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(8, 512, (b, length), generator=gen)
        for row in range(b):
            for j in torch.randperm(length // BS, generator=gen)[:heavy_blocks].tolist():
                ids[row, j * BS : j * BS + fill] = torch.randint(0, 8, (fill,), generator=gen)
        out.append(ids)
    return out


@pytest.fixture(scope="module")
def sink():
    model = _sink_model()
    untrained = build_predictors(model, sparse_layers=[1, 2], block_size=BS, widths=(64, 32), seed=0)
    trained = train_predictors(
        model, _sink_batches(40, 1), sparse_layers=[1, 2], block_size=BS, widths=(64, 32), lr=1e-2, seed=0
    )
    evals = _sink_batches(8, 99)
    return model, untrained, trained, evals


# ----------------------------------------------------------------------------- map shape, reading, masks
def test_predicted_map_shape_causal_and_reading():
    torch.manual_seed(0)
    p = LayerPredictor(num_heads=4, head_dim=16, slice_dim=16, block_size=BS, widths=(32, 16))
    normed = torch.randn(2, 100, 64)  # partial last block: 100 = 6 * 16 + 4
    m = p.block_map(normed)
    assert m.shape == (2, 7, 7) and m.dtype == torch.float32
    lower = torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.all(m[:, ~lower] == 0) and torch.all(m[:, lower] != 0)
    s = p.scores(normed)
    assert s.shape == (2, 7) and torch.all(s >= 0)
    torch.testing.assert_close(s, m.clamp(min=0).sum(1))
    # documented reading: x[b, I, h, t * w + c] = normed[b, I * bs + t, h * w + c], zero past the end
    x = head_blocks(normed, BS, 4)
    assert x.shape == (2, 7, 4, BS * 16)
    assert torch.equal(x[1, 2, 3].view(BS, 16), normed[1, 32:48, 48:64])
    assert torch.equal(x[0, 6, 1].view(BS, 16)[:4], normed[0, 96:100, 16:32])
    assert torch.all(x[:, 6, :, 4 * 16 :] == 0)


def test_tile_mask_matches_oracle_zeros_with_padding_and_packing():
    # positive q, k: every allowed pair has P > 0, so the oracle map is nonzero exactly on allowed tiles
    pos = torch.tensor([list(range(20)) + list(range(30)) + list(range(14)), list(range(64))])
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 40:] = 0
    mask[0, :3] = 0
    layout = make_layout(2, 64, "cpu", mask, pos)
    q, k = torch.rand(2, 2, 64, 8), torch.rand(2, 2, 64, 8)
    for bs in (4, 7, 16):
        ref = block_scores_reference(q, k, bs, doc_ids=layout.doc_ids)
        allowed = allowed_tiles(64, bs, "cpu", layout.doc_ids)
        assert torch.equal(allowed, ref > 0), bs
    p = LayerPredictor(num_heads=2, head_dim=8, slice_dim=4, block_size=7, widths=(8, 8))
    m = p.block_map(torch.randn(2, 64, 8), layout.doc_ids)
    assert torch.all(m[~allowed_tiles(64, 7, "cpu", layout.doc_ids)] == 0)


# ----------------------------------------------------------------------------- a known map -> oracle's selection
def _exact_predictor(wq, wk, heads, bs, scale):
    """Predictor whose q^/k^ are W x-bar (x-bar = block mean of the head slice): exact for block-constant,
    nonnegative inputs, where the oracle's tile max is the single value scale/H * sum_h <q_h, k_h>."""
    hd, w = wq.shape
    p = LayerPredictor(num_heads=heads, head_dim=hd, slice_dim=w, block_size=bs, widths=(hd, hd))
    with torch.no_grad():
        for path, mat, out_scale in ((p.q, wq, scale / heads), (p.k, wk, 1.0)):
            path.weights[0][0] = mat.t().repeat(bs, 1) / bs  # (bs * w, hd): mean over the block's tokens
            path.weights[1][0] = torch.eye(hd)
            path.weights[2][0] = torch.eye(hd) * out_scale
            for b in path.biases:
                b.zero_()
    return p


def test_predictor_reproducing_a_known_map_selects_like_the_oracle():
    torch.manual_seed(0)
    heads, hd, bs, nb = 2, 8, 4, 12
    wq, wk = torch.rand(hd, hd), torch.rand(hd, hd)
    parts = LayerParts(
        attn_norm=nn.Identity(),
        q_proj=nn.Linear(heads * hd, heads * hd, bias=False),
        k_proj=nn.Linear(heads * hd, heads * hd, bias=False),
        v_proj=None,
        o_proj=None,
        mlp_norm=None,
        mlp=None,
        attn_module=nn.Module(),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hd,
        scaling=hd**-0.5,
        q_prescale=1.0,
        rope=False,
        dropout=0.0,
        gated_mlp=None,
    )
    with torch.no_grad():
        parts.q_proj.weight.copy_(torch.block_diag(wq, wq))
        parts.k_proj.weight.copy_(torch.block_diag(wk, wk))
    hidden = torch.rand(3, nb, heads * hd).repeat_interleave(bs, dim=1)  # block-constant, nonnegative
    layout = TokenLayout(torch.zeros(3, nb * bs, dtype=torch.int32))
    pred = _exact_predictor(wq, wk, heads, bs, parts.scaling)
    scorer = PredictorScorer(PredictorSet({0: pred}, {"block_size": bs}))
    oracle = OracleScorer("torch")(parts, hidden, None, layout, bs)
    predicted = scorer(parts, hidden, None, layout, bs, layer=0)
    torch.testing.assert_close(predicted, oracle, rtol=1e-5, atol=1e-6)
    valid = block_valid(layout.valid, bs)
    for kw in (dict(keep_ratio=0.4), dict(keep_ratio=0.25, keep_first=True), dict(threshold=1.0)):
        assert torch.equal(select_blocks(predicted, valid, **kw), select_blocks(oracle, valid, **kw)), kw


# ----------------------------------------------------------------------------- training
def test_training_reduces_loss_and_beats_untrained_recall(sink):
    model, untrained, trained, evals = sink
    curve = trained.meta["training"]["loss_curve"]
    assert len(curve) == 40 and all(math.isfinite(x) for x in curve)
    assert sum(curve[-5:]) / 5 < 0.25 * sum(curve[:5]) / 5
    before = recall_rows(collect_scores(model, untrained, evals), 0.4)
    after = recall_rows(collect_scores(model, trained, evals), 0.4)
    assert [r["layer"] for r in after] == [1, 2, "all"]
    assert all(0.0 <= r["recall"] <= 1.0 for r in after)
    assert after[-1]["recall"] > before[-1]["recall"] + 0.05, (before[-1], after[-1])
    assert after[-1]["recall"] > 0.8


def test_training_accepts_padding_and_packing():
    model = build_model("llama2-tiny", dtype=torch.float32, seed=0)
    ids = torch.randint(0, 512, (2, 100))
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, 70:] = 0
    pos = torch.cat([torch.arange(40), torch.arange(60)])[None].expand(2, -1)
    batches = [dict(input_ids=ids, attention_mask=mask, position_ids=pos)] * 3
    p = train_predictors(model, batches, block_size=BS, widths=(16, 8))
    assert p.meta["training"]["steps"] == 3 and all(math.isfinite(x) for x in p.meta["training"]["loss_curve"])


# ----------------------------------------------------------------------------- elastic size
def test_pruning_drops_dead_units_and_keeps_outputs():
    torch.manual_seed(0)
    p = LayerPredictor(num_heads=4, head_dim=16, slice_dim=16, block_size=BS, widths=(16, 12))
    dead = [3, 5]
    with torch.no_grad():
        p.q.biases[0][0, dead] = -1e4  # these ReLU units are always zero
    normed = torch.randn(2, 128, 64)
    predictors = PredictorSet({7: p}, {"block_size": BS})
    predictors.set_tracking(True)
    hidden_before = []
    with torch.no_grad():
        x = head_blocks(normed, BS, 4).flatten(0, 1)
        out_before = p.q(x, hidden_before)
        map_before = p.block_map(normed)
    predictors.set_tracking(False)
    freq = p.q.zero_frequency()[0]
    assert torch.all(freq[dead] == 1.0)
    changes = prune_set(predictors, fraction=0.5, min_width=4, min_zero_freq=1.0)  # only always-zero units go
    assert p.q.widths[0] == 16 - len(dead) and changes
    keep = torch.tensor([i for i in range(16) if i not in dead])
    hidden_after = []
    with torch.no_grad():
        out_after = p.q(x, hidden_after)
        torch.testing.assert_close(p.block_map(normed), map_before)
    torch.testing.assert_close(out_after, out_before)
    torch.testing.assert_close(hidden_after[0], hidden_before[0][..., keep])


def test_pruning_during_training_shrinks_and_carries_optimizer_state():
    model = build_model("llama2-tiny", dtype=torch.float32, seed=0)
    batches = [torch.randint(0, 512, (1, 128)) for _ in range(7)]
    p = train_predictors(
        model, batches, block_size=BS, widths=(32, 16), prune_every=3, prune_fraction=0.25, min_width=8
    )
    events = p.meta["training"]["prune_events"]
    assert [e["step"] for e in events] == [3, 6]
    for layer in p.layers:
        assert p[layer].widths() == {"q": [18, 9], "k": [18, 9]}  # 32 -> 24 -> 18, 16 -> 12 -> 9
    assert events[1]["parameters"] == p.parameter_count() < events[0]["parameters"]
    # optimizer state is sliced with the parameter
    lin = nn.Parameter(torch.randn(1, 6, 4))
    opt = torch.optim.AdamW([lin], lr=0.1)
    lin.sum().backward()
    opt.step()
    keep = torch.tensor([0, 2, 5])
    new = nn.Parameter(lin.detach()[:, keep])
    old_avg = opt.state[lin]["exp_avg"].clone()
    rebuild_optimizer(opt, [new], [(lin, new, 1, keep)])
    assert torch.equal(opt.state[new]["exp_avg"], old_avg[:, keep]) and lin not in opt.state
    new.grad = torch.ones_like(new)
    opt.step()  # keeps stepping with the sliced state


# ----------------------------------------------------------------------------- storage and identity
def test_save_load_round_trip_and_identity_mismatch(tmp_path, sink):
    model, _, trained, evals = sink
    out = trained.save(tmp_path / "p")
    meta = json.loads((out / "predictors.json").read_text())
    assert meta["sparse_layers"] == [1, 2] and meta["block_size"] == BS and len(meta["training"]["loss_curve"]) == 40
    loaded = PredictorSet.load(out)
    assert loaded.layers == trained.layers and loaded.parameter_count() == trained.parameter_count()
    for (k, a), (k2, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    scorer = load_scorer(out, model)
    assert isinstance(scorer, PredictorScorer)
    # a bf16 copy of the same weights still matches the fingerprint
    load_scorer(out, _sink_model().to(torch.bfloat16))
    with pytest.raises(ValueError, match="another model.*lemo train-predictors"):
        load_scorer(out, build_model("llama2-tiny", dtype=torch.float32, seed=1))
    with pytest.raises(ValueError, match="another model.*num_kv_heads.*lemo train-predictors"):
        load_scorer(out, build_model("llama3-tiny", dtype=torch.float32, seed=0))
    with pytest.raises(ValueError, match="block_size"):
        apply_lemo(
            _sink_model(),
            LeMoConfig(
                shared_selection=False,
                loss_tokens="all",
                sparse_first=None,
                scorer="predictor",
                predictor_path=str(out),
                block_size=64,
            ),
        )
    with pytest.raises(ValueError, match="holds no predictors"):
        PredictorSet.load(tmp_path)


# ----------------------------------------------------------------------------- inside apply_lemo
def test_apply_lemo_with_predictor_scorer(tmp_path):
    model = tiny_lora_model("llama2-tiny")
    path = str(
        build_predictors(model, sparse_layers=[1, 2], block_size=BS, widths=(32, 16), seed=3).save(tmp_path / "p")
    )
    apply_lemo(
        model,
        LeMoConfig(
            shared_selection=False,
            loss_tokens="all",
            sparse_first=None,
            scorer="predictor",
            predictor_path=path,
            block_size=BS,
            keep_ratio=0.4,
            segment_loss_tokens=0,
        ),
    )
    lm = unwrap(model)
    adapter = get_adapter(lm.config.model_type)
    layers = adapter.decoder(lm).layers
    seen = {}
    hooks = [
        layers[i].register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(i, (args[0].detach(), kwargs["position_embeddings"])),
            with_kwargs=True,
        )
        for i in (1, 2)
    ]
    ids = torch.randint(0, 512, (2, 150))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 101:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    for h in hooks:
        h.remove()
    assert torch.isfinite(out.loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)
    state = lemo_state(model)
    for i in (1, 2):
        scorer = layers[i].scorer
        assert isinstance(scorer, PredictorScorer) and scorer.layer_index(adapter.parts(layers[i])) == i
        hidden, pe = seen[i]
        scores = scorer(adapter.parts(layers[i]), hidden, pe, state.layout, BS)
        expect = select_blocks(scores, block_valid(state.layout.valid, BS), keep_ratio=0.4)
        assert torch.equal(state.selections[i].kept_blocks, expect)


# ----------------------------------------------------------------------------- thresholds
def test_threshold_tuning_reaches_target_recall(sink):
    model, _, trained, evals = sink
    scores = collect_scores(model, trained, evals)
    thresholds, rows = tune_thresholds(scores, keep_ratio=0.4, target_recall=0.9)
    assert sorted(thresholds) == trained.layers and all(math.isfinite(t) and t >= 0 for t in thresholds.values())
    cfg = LeMoConfig(
        shared_selection=False, loss_tokens="all", sparse_first=None, selection="threshold", threshold=thresholds
    )
    for layer, entries in scores.items():
        hit = total = kept = valid_n = 0
        for pred, oracle, valid in entries:
            o = select_blocks(oracle, valid, keep_ratio=0.4)
            p = select_blocks(pred, valid, threshold=cfg.layer_threshold(layer))
            hit, total, kept, valid_n = (
                hit + int((p & o).sum()),
                total + int(o.sum()),
                kept + int(p.sum()),
                valid_n + int(valid.sum()),
            )
        assert hit / total >= 0.9
        assert kept / valid_n < 1.0  # reached without keeping everything
    assert all(r["feasible"] for r in rows)
    mass, _ = tune_thresholds(scores, keep_ratio=0.4, target_recall=0.95, metric="mass")
    assert sorted(mass) == trained.layers


# ----------------------------------------------------------------------------- CLI
def test_cli_train_and_eval(tmp_path, monkeypatch, capsys):
    import lemo.predictors.commands as commands

    def fake_corpus(corpus, split, context, batch, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(0, 512, (batch, context), generator=gen) for _ in range(steps)]

    monkeypatch.setattr(commands, "_corpus_batches", fake_corpus)
    out = tmp_path / "pred"
    assert (
        cli_main(
            [
                "train-predictors",
                "--model",
                "llama2-tiny",
                "--out",
                str(out),
                "--steps",
                "0",
                "--sparse-layers",
                "1,2",
                "--block-size",
                str(BS),
                "--widths",
                "16,8",
            ]
        )
        == 0
    )
    assert json.loads((out / "predictors.json").read_text())["training"]["steps"] == 0
    assert (
        cli_main(
            [
                "train-predictors",
                "--model",
                "llama2-tiny",
                "--corpus",
                "x",
                "--out",
                str(out),
                "--steps",
                "4",
                "--sparse-layers",
                "1,2",
                "--context",
                "128",
                "--block-size",
                str(BS),
                "--widths",
                "16,8",
                "--prune-every",
                "2",
            ]
        )
        == 0
    )
    csv_path = tmp_path / "new" / "recall.csv"  # a folder that does not exist yet
    assert (
        cli_main(
            [
                "eval-predictors",
                "--model",
                "llama2-tiny",
                "--predictors",
                str(out),
                "--corpus",
                "x",
                "--out",
                str(csv_path),
                "--context",
                "128",
                "--batches",
                "2",
                "--tune-thresholds",
            ]
        )
        == 0
    )
    import pandas as pd

    frame = pd.read_csv(csv_path)
    assert set(frame["selection"]) == {"topk", "threshold"} and len(frame) == 6
    tuned = json.loads(csv_path.with_suffix(".thresholds.json").read_text())
    assert set(tuned["threshold"]) == {"1", "2"}


def test_identity_samples_stay_in_range_for_large_weights():
    """7B embeddings hold more than 2**24 values, where float32 index arithmetic rounds past the end."""
    from lemo.predictors.identity import _sample

    n = 2**25 + 3
    w = torch.arange(n, dtype=torch.int64) % 1000  # exact in float32 after sampling
    expected = [float((k * (n - 1) // 7) % 1000) for k in range(8)]
    assert _sample(w) == expected  # first and last value included, nothing past the end


def test_a_shared_selection_needs_a_predictor_for_its_first_sparse_layer_only(tmp_path):
    model = tiny_lora_model("llama2-tiny")
    path = str(build_predictors(model, sparse_layers=[1], block_size=BS, widths=(32, 16), seed=3).save(tmp_path / "p"))
    common = dict(scorer="predictor", predictor_path=path, block_size=BS, sparse_layers=[1, 2], segment_loss_tokens=0)
    with pytest.raises(ValueError, match=r"not sparse layers \[2\]"):
        apply_lemo(model, LeMoConfig(shared_selection=False, loss_tokens="all", sparse_first=None, **common))
    apply_lemo(model, LeMoConfig(shared_selection=True, **common))
    ids = torch.randint(0, 512, (1, 128))
    model(input_ids=ids, labels=ids).loss.backward()
    sel = lemo_state(model).selections
    assert set(sel) == {1, 2} and sel[1] is sel[2]
