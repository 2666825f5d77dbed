"""LeMo's sparse path against references: the untouched model (keep 1.0) and a masked dense model."""

import copy
import math

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state, remove_lemo
from lemo.models.adapters import get_adapter, unwrap
from lemo.models.registry import build_model
from lemo_baselines.attention import attention_context
from lemo_baselines.lora import apply_lora
from tests.helpers import (
    FAMILIES,
    assert_grads_close,
    layout_batch,
    lora_grads,
    patch_reference_layers,
    tiny_lora_model,
)


def _loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), lora_grads(model)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_keep_ratio_one_equals_untouched_model(name, checkpointing):
    model = tiny_lora_model(name)
    ids = torch.randint(0, 512, (2, 150))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with attention_context("sdpa-flash"):
        ref_logits = model(input_ids=ids).logits.detach()
        ref_loss, ref_grads = _loss_and_grads(model, input_ids=ids, labels=ids)
        apply_lemo(
            model,
            LeMoConfig(
                shared_selection=False,
                loss_tokens="all",
                sparse_first=None,
                keep_ratio=1.0,
                mlp_mode="token",
                segment_loss_tokens=0,
                block_size=16,
            ),
        )
        logits = model(input_ids=ids).logits.detach()
        loss, grads = _loss_and_grads(model, input_ids=ids, labels=ids)
    assert lemo_state(model).selections, "no sparse layer ran"
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(grads, ref_grads)


def test_peft_after_lemo_and_remove_restores():
    base = build_model("llama3-tiny", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 130))
    reference = copy.deepcopy(base)
    apply_lemo(
        base,
        LeMoConfig(
            shared_selection=False,
            loss_tokens="all",
            sparse_first=None,
            keep_ratio=0.5,
            block_size=16,
            segment_loss_tokens=0,
        ),
    )
    model = apply_lora(base)  # LoRA after LeMo: targets found inside the LeMo layers
    names_with = {n for n, _ in model.named_parameters()}
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert any("lora_A" in n and p.grad is not None for n, p in model.named_parameters())
    assert names_with == {n for n, _ in apply_lora(copy.deepcopy(reference)).named_parameters()}
    remove_lemo(model)
    model = model.unload()
    assert set(model.state_dict()) == set(reference.state_dict())
    model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_eval_mode_runs_the_dense_model():
    model = tiny_lora_model("llama2-tiny")
    ids = torch.randint(0, 512, (1, 100))
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        apply_lemo(
            model,
            LeMoConfig(shared_selection=False, loss_tokens="all", sparse_first=None, keep_ratio=0.3, block_size=16),
        )
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


# ---- masked dense reference -------------------------------------------------------------------


def _reference_layer(layer, parts, keep, doc_ids, mlp_mode):
    """Dense computation of a sparse layer: eliminated tokens' updates are zeroed and their keys masked."""

    def forward(hidden_states, *args, position_embeddings=None, **kwargs):
        b, length, _ = hidden_states.shape
        m = keep.to(hidden_states.dtype)[..., None]  # (B, L, 1)
        h = parts.attn_norm(hidden_states)
        q = parts.q_proj(h).view(b, length, parts.num_heads, parts.head_dim).transpose(1, 2) * parts.q_prescale
        k = parts.k_proj(h).view(b, length, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
        v = parts.v_proj(h).view(b, length, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
        if parts.rope:
            cos, sin = position_embeddings
            cos, sin = cos[:, None], sin[:, None]
            rot = lambda x: torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1)  # noqa: E731
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        g = parts.num_heads // parts.num_kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        i = torch.arange(length)
        allowed = (i[None, :, None] >= i[None, None, :]) & keep[:, :, None] & keep[:, None, :]
        allowed &= (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0)
        allowed |= torch.eye(length, dtype=torch.bool)[None]  # eliminated rows: anything finite, zeroed below
        scores = (q @ k.transpose(-1, -2)) * parts.scaling
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, -1)
        x = hidden_states + m * parts.o_proj(attn)
        mlp_out = parts.mlp(parts.mlp_norm(x))
        return x + (m * mlp_out if mlp_mode == "token" else mlp_out)

    return forward


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", ["simple", "padded", "packed"])
def test_sparse_layers_match_masked_dense_reference(name, mode):
    if mode == "packed" and name.startswith("opt"):
        pytest.skip("OPT's learned positions are absolute; packing is a RoPE-model feature here")
    torch.manual_seed(1)
    model = tiny_lora_model(name)
    batch = layout_batch(mode, *((1, 77) if mode == "simple" else (2, 150)))
    reference = copy.deepcopy(model)
    cfg = LeMoConfig(
        shared_selection=False,
        loss_tokens="all",
        sparse_first=None,
        keep_ratio=0.4,
        block_size=16,
        mlp_mode="token",
        segment_loss_tokens=0,
    )
    apply_lemo(model, cfg)
    with attention_context("sdpa-math"):
        loss, grads = _loss_and_grads(model, **batch)
    state = lemo_state(model)
    assert set(state.selections) == {1, 2}
    # Patch the reference's sparse layers with masked dense computations using LeMo's own selections.
    keeps = patch_reference_layers(
        reference, state, lambda layer, parts, keep: _reference_layer(layer, parts, keep, state.layout.doc_ids, "token")
    )
    for keep in keeps.values():
        kept_frac = keep.float().mean().item()
        assert 0.2 < kept_frac < 0.7, kept_frac  # something was eliminated, something kept
    with attention_context("sdpa-math"):
        ref_loss, ref_grads = _loss_and_grads(reference, **batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_channel_mode_forward_equals_token_mode_reference_forward():
    """Channel mode changes only the MLP's backward: forward loss equals the dense-MLP reference."""
    model = tiny_lora_model("llama2-tiny")
    ids = torch.randint(0, 512, (1, 96))
    reference = copy.deepcopy(model)
    apply_lemo(
        model,
        LeMoConfig(
            shared_selection=False,
            loss_tokens="all",
            sparse_first=None,
            keep_ratio=0.5,
            block_size=16,
            mlp_mode="channel",
            segment_loss_tokens=0,
        ),
    )
    loss = model(input_ids=ids, labels=ids).loss
    state = lemo_state(model)
    lm = unwrap(reference)
    adapter = get_adapter(lm.config.model_type)
    for i, sel in state.selections.items():
        keep = torch.zeros(96, dtype=torch.bool)
        keep[sel.index] = True
        layer = adapter.decoder(lm).layers[i]
        layer.forward = _reference_layer(layer, adapter.parts(layer), keep.view(1, 96), state.layout.doc_ids, "channel")
    torch.testing.assert_close(loss, reference(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)


def test_selection_is_not_recomputed_under_checkpointing(monkeypatch):
    model = tiny_lora_model("llama2-tiny")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_lemo(
        model,
        LeMoConfig(
            shared_selection=False,
            loss_tokens="all",
            sparse_first=None,
            keep_ratio=0.5,
            block_size=16,
            segment_loss_tokens=0,
        ),
    )
    calls = []
    lm = unwrap(model)
    layer = lm.model.layers[1]
    original = layer.scorer.__call__

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, "scorer", type("S", (), {"__call__": staticmethod(counting)})())
    ids = torch.randint(0, 512, (1, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 1 and lemo_state(model).selections


@pytest.mark.parametrize(
    "bad, words",
    [
        (dict(sparse_layers=[9]), "out of range"),
    ],
)
def test_bad_config_fails_clearly(bad, words):
    model = tiny_lora_model("llama2-tiny")
    with pytest.raises(ValueError, match=words):
        apply_lemo(model, LeMoConfig(shared_selection=False, loss_tokens="all", sparse_first=None, **bad))


def test_unsupported_models_fail_clearly():
    with pytest.raises(ValueError, match="pre-norm"):
        apply_lemo(
            build_model("opt-350m", device="meta"),
            LeMoConfig(shared_selection=False, loss_tokens="all", sparse_first=None),
        )
    with pytest.raises(ValueError, match="gated SiLU"):
        apply_lemo(
            build_model("opt-tiny", dtype=torch.float32),
            LeMoConfig(shared_selection=False, loss_tokens="all", sparse_first=None, mlp_mode="channel"),
        )
    gpt2 = type("Fake", (), {"config": type("C", (), {"model_type": "gpt2"})()})()
    with pytest.raises(ValueError, match="does not support model_type 'gpt2'"):
        apply_lemo(gpt2, LeMoConfig(shared_selection=False, loss_tokens="all", sparse_first=None))
    model = tiny_lora_model("llama2-tiny")
    apply_lemo(model, LeMoConfig(shared_selection=False, loss_tokens="all", sparse_first=None))
    with pytest.raises(ValueError, match="already applied"):
        apply_lemo(model, LeMoConfig(shared_selection=False, loss_tokens="all", sparse_first=None))


def test_kept_fraction_follows_keep_ratio():
    model = tiny_lora_model("llama2-tiny")
    length, bs = 200, 16
    apply_lemo(
        model,
        LeMoConfig(
            shared_selection=False,
            loss_tokens="all",
            sparse_first=None,
            keep_ratio=0.3,
            block_size=bs,
            segment_loss_tokens=0,
        ),
    )
    ids = torch.randint(0, 512, (1, length))
    model(input_ids=ids, labels=ids)
    nb = math.ceil(length / bs)
    for sel in lemo_state(model).selections.values():
        assert int(sel.kept_blocks.sum()) == math.ceil(0.3 * nb)
        assert torch.equal(sel.index, sel.index.sort().values)
