"""The compact residual stream (LeMoConfig.compact_stream): same function as per-layer gathering, and the
inputs gradient checkpointing keeps in a run's later layers hold kept rows only."""

import copy

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo.bench.measure import count_saved_bytes
from lemo.models.adapters import get_adapter, unwrap
from lemo_baselines.attention import attention_context
from tests.helpers import FAMILIES, assert_grads_close, layout_batch, patch_reference_layers, tiny_lora_model
from tests.test_elimination import _loss_and_grads, _reference_layer

# layers 0..2 of the tiny 4-layer models: a run with a first, a middle and a last layer
CONFIG = dict(shared_selection=True, sparse_first=0, keep_ratio=0.4, block_size=16, mlp_mode="token")


def _layers(model):
    lm = unwrap(model)
    return get_adapter(lm.config.model_type).decoder(lm).layers


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", ["simple", "padded", "packed"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compact_stream_matches_masked_dense_reference(name, mode, checkpointing):
    if mode == "packed" and name.startswith("opt"):
        pytest.skip("OPT's learned positions are absolute; packing is a RoPE-model feature here")
    torch.manual_seed(2)
    model = tiny_lora_model(name)
    batch = layout_batch(mode)
    reference = copy.deepcopy(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_lemo(model, LeMoConfig(**CONFIG, loss_tokens="all", segment_loss_tokens=0))
    assert [layer.compact for layer in _layers(model)[:3]] == [(True, False), (False, False), (False, True)]
    with attention_context("sdpa-math"):
        loss, grads = _loss_and_grads(model, **batch)
    state = lemo_state(model)
    assert set(state.selections) == {0, 1, 2} and state.stream is None  # the run ended and let go of its input
    keeps = patch_reference_layers(
        reference, state, lambda layer, parts, keep: _reference_layer(layer, parts, keep, state.layout.doc_ids, "token")
    )
    assert all(0.2 < keep.float().mean().item() < 0.7 for keep in keeps.values())
    with attention_context("sdpa-math"):
        ref_loss, ref_grads = _loss_and_grads(reference, **batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["llama2-tiny", "opt-tiny"])
@pytest.mark.parametrize("movement", ["torch", "triton"])
def test_compact_stream_equals_per_layer_movement_with_the_default_config(name, movement):
    """With movement="triton" a run's norms and RoPE are the Triton kernels (interpreter here, fp32)."""
    torch.manual_seed(3)
    batch = layout_batch("padded")
    results = []
    for compact, mode in ((True, movement), (False, "torch")):
        model = tiny_lora_model(name)
        # default loss (kept) and segments
        apply_lemo(model, LeMoConfig(**CONFIG, compact_stream=compact, movement_kernel=mode))
        assert (_layers(model)[1].compact is not None) == compact
        results.append(_loss_and_grads(model, **batch))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    assert_grads_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["padded", "packed"])
@pytest.mark.parametrize("checkpointing", [None, False, True])  # off, non-reentrant, reentrant
def test_triton_compact_run_equals_per_layer_torch_in_every_layout(mode, checkpointing):
    """The Triton norms and RoPE of a compact run (per-row cos/sin tables when packed) under checkpointing."""
    torch.manual_seed(6)
    batch = layout_batch(mode)
    results = []
    for compact, movement in ((True, "triton"), (False, "torch")):
        model = tiny_lora_model("llama2-tiny")
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        apply_lemo(model, LeMoConfig(**CONFIG, compact_stream=compact, movement_kernel=movement))
        results.append(_loss_and_grads(model, **batch))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    assert_grads_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_checkpoints_of_a_compact_run_hold_kept_rows_only():
    length = 320
    ids = torch.randint(0, 512, (1, length))
    saved, totals = {}, {}
    for compact in (True, False):
        torch.manual_seed(4)
        model = tiny_lora_model("llama2-tiny")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        apply_lemo(model, LeMoConfig(**CONFIG, compact_stream=compact))
        with count_saved_bytes(model, dict(enumerate(_layers(model)))) as counted:
            model(input_ids=ids, labels=ids)
        saved[compact], totals[compact] = counted.by_module, counted.total
        kept = lemo_state(model).shared.total
    assert 0 < kept < length
    full = saved[False][0]  # one layer input: the run's first layer keeps the full stream it gathers from
    assert saved[True][0] == full
    assert saved[True][1] == full * kept // length  # a middle layer keeps its kept-row input only
    # the last layer also holds the run's input (to scatter into): layer 0's own storage, counted once in total
    assert saved[True][2] == full * kept // length + full
    assert totals[True] == totals[False] - 2 * (full - full * kept // length)


@pytest.mark.parametrize(
    "change",
    [dict(shared_selection=False), dict(mlp_mode="channel"), dict(eliminated="frozen"), dict(compact_stream=False)],
)
def test_compact_stream_only_where_it_applies(change):
    model = tiny_lora_model("llama2-tiny")
    apply_lemo(model, LeMoConfig(**{**CONFIG, **change}))
    assert all(layer.compact is None for layer in _layers(model)[:3])


def test_non_consecutive_sparse_layers_form_runs_of_their_own():
    model = tiny_lora_model("llama2-tiny")
    apply_lemo(model, LeMoConfig(**{**CONFIG, "sparse_layers": [0, 2, 3]}))
    layers = _layers(model)
    assert [layers[i].compact for i in (0, 2, 3)] == [(True, True), (True, False), (False, True)]
    ids = torch.randint(0, 512, (1, 96))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_with_a_dense_layer_before_the_run(reentrant):
    """Reentrant checkpointing gives gradients to checkpoint inputs only: the run's input reaches its last
    layer as one, so the eliminated rows' gradient takes the same path as without the compact stream."""
    torch.manual_seed(5)
    batch = layout_batch("padded")
    results = []
    for compact in (True, False):
        model = tiny_lora_model("llama2-tiny")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        apply_lemo(model, LeMoConfig(**{**CONFIG, "sparse_first": 1}, loss_tokens="all", compact_stream=compact))
        assert (_layers(model)[1].compact is not None) == compact
        results.append(_loss_and_grads(model, **batch))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    assert_grads_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_layerdrop_turns_the_compact_stream_off(monkeypatch):
    """A dropped layer could be a run's last: under layerdrop the sparse layers move rows themselves."""
    import lemo.apply

    calls = []
    real = lemo.apply.compact_layer
    monkeypatch.setattr(lemo.apply, "compact_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_lora_model("opt-tiny")
    apply_lemo(model, LeMoConfig(**CONFIG))
    batch = layout_batch("simple")
    model(**batch)
    assert calls  # the run is compact without layerdrop
    calls.clear()
    unwrap(model).model.decoder.layerdrop = 0.5
    for seed in range(4):
        torch.manual_seed(seed)
        out = model(**batch)
        assert out.loss.isfinite() and lemo_state(model).stream is None
    assert not calls


def test_fidelity_attention_masses_see_the_full_stream_inside_a_run():
    from lemo.accuracy.fidelity import run_fidelity

    model = tiny_lora_model("llama3-tiny")
    ids = torch.randint(0, 512, (1, 256))
    masses = []
    for compact in (True, False):
        variant = {"v": dict(CONFIG, keep_ratio=0.25, segment_loss_tokens=0, compact_stream=compact)}
        rows = run_fidelity(model, ids, variant, attention_mass=True)
        masses.append({(r["metric"], r["layer"]): r["value"] for r in rows if r["metric"].startswith("mass_")})
    assert len(masses[0]) == 6 and masses[0] == pytest.approx(masses[1])
