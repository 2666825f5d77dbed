"""Frozen updates (LeMoConfig.eliminated="frozen") against a masked dense reference.

Kept tokens: attention among kept tokens, with gradient (as plain elimination). Eliminated tokens:
the layer's update computed without gradient, their queries seeing the kept tokens plus their own
block ("local") or every earlier token ("all").
"""

import copy

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo_baselines.attention import attention_context
from tests.helpers import assert_grads_close, lora_grads, patch_reference_layers, tiny_lora_model


def _rot(x):
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1)


def _frozen_reference(parts, keep, doc_ids, mlp_mode, keys, block_size):
    def attention(hidden_states, position_embeddings, allowed):
        b, length, _ = hidden_states.shape
        h = parts.attn_norm(hidden_states)
        q = parts.q_proj(h).view(b, length, parts.num_heads, parts.head_dim).transpose(1, 2) * parts.q_prescale
        k = parts.k_proj(h).view(b, length, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
        v = parts.v_proj(h).view(b, length, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + _rot(q) * sin, k * cos + _rot(k) * sin
        g = parts.num_heads // parts.num_kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = ((q @ k.transpose(-1, -2)) * parts.scaling).masked_fill(~allowed[:, None], float("-inf"))
        return parts.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, -1))

    def forward(hidden_states, *args, position_embeddings=None, **kwargs):
        length = hidden_states.shape[1]
        m = keep.to(hidden_states.dtype)[..., None]
        i = torch.arange(length)
        causal = (i[None, :, None] >= i[None, None, :]) & (doc_ids[:, :, None] == doc_ids[:, None, :])
        eye = torch.eye(length, dtype=torch.bool)[None]
        kept_att = attention(hidden_states, position_embeddings, (causal & keep[:, None, :]) | eye)
        same_block = (i[:, None] // block_size) == (i[None, :] // block_size)
        seen = torch.ones_like(causal) if keys == "all" else keep[:, None, :] | same_block[None]
        with torch.no_grad():
            elim_att = attention(hidden_states, position_embeddings, causal & seen)
        x = hidden_states + m * kept_att + (1 - m) * elim_att
        if mlp_mode != "token":
            return x + parts.mlp(parts.mlp_norm(x))
        with torch.no_grad():
            elim_mlp = parts.mlp(parts.mlp_norm(x))
        return x + m * parts.mlp(parts.mlp_norm(x)) + (1 - m) * elim_mlp

    return forward


@pytest.mark.parametrize("name", ["llama2-tiny", "llama3-tiny"])
@pytest.mark.parametrize("keys", ["local", "all"])
@pytest.mark.parametrize("mlp_mode", ["token", "dense"])
@pytest.mark.parametrize("movement", ["torch"])
def test_frozen_matches_masked_dense_reference(name, keys, mlp_mode, movement):
    torch.manual_seed(3)
    model = tiny_lora_model(name)
    b, length, bs = 2, 150, 16
    ids = torch.randint(0, 512, (b, length))
    pos = torch.cat([torch.arange(60), torch.arange(90)])[None].expand(b, -1)  # two packed documents
    batch = {"input_ids": ids, "labels": ids, "position_ids": pos}
    reference = copy.deepcopy(model)
    cfg = LeMoConfig(
        shared_selection=False,
        loss_tokens="all",
        sparse_first=None,
        keep_ratio=0.4,
        block_size=bs,
        mlp_mode=mlp_mode,
        segment_loss_tokens=0,
        eliminated="frozen",
        frozen_keys=keys,
        movement_kernel=movement,
    )
    apply_lemo(model, cfg)
    with attention_context("sdpa-math"):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
    grads = lora_grads(model)
    state = lemo_state(model)
    keeps = patch_reference_layers(
        reference,
        state,
        lambda layer, parts, keep: _frozen_reference(parts, keep, state.layout.doc_ids, mlp_mode, keys, bs),
    )
    for i, keep in keeps.items():
        assert 0.2 < keep.float().mean() < 0.7
        sel = state.selections[i]
        assert torch.equal(torch.sort(torch.cat([sel.index, sel.eliminated])).values, torch.arange(b * length))
    with attention_context("sdpa-math"):
        ref_loss = reference(**batch).loss
        ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, lora_grads(reference), rtol=1e-4, atol=1e-6)


def test_frozen_is_closer_to_dense_than_skip():
    """The point of frozen updates: the training forward stays near the dense model's."""
    torch.manual_seed(0)
    base = tiny_lora_model("llama2-tiny")
    ids = torch.randint(0, 512, (1, 256))
    dense = base(input_ids=ids, labels=ids).loss.item()
    gaps = {}
    for eliminated in ("skip", "frozen"):
        model = copy.deepcopy(base)
        apply_lemo(
            model,
            LeMoConfig(
                shared_selection=False,
                loss_tokens="all",
                sparse_first=None,
                keep_ratio=0.25,
                block_size=16,
                eliminated=eliminated,
                frozen_keys="all",
                segment_loss_tokens=0,
            ),
        )
        gaps[eliminated] = abs(model(input_ids=ids, labels=ids).loss.item() - dense)
    assert gaps["frozen"] < gaps["skip"]


def test_frozen_saves_nothing_of_eliminated_tokens():
    """Saved-for-backward bytes of frozen equal those of plain elimination (same kept tokens), but for
    the eliminated tokens' index that adds their constant update to the residual stream."""
    from lemo.bench.measure import saved_activation_bytes

    torch.manual_seed(0)
    base = tiny_lora_model("llama2-tiny")
    ids = torch.randint(0, 512, (1, 512))
    saved = {}
    for eliminated in ("skip", "frozen"):
        model = copy.deepcopy(base)
        apply_lemo(
            model,
            LeMoConfig(
                shared_selection=False,
                loss_tokens="all",
                sparse_first=None,
                keep_ratio=0.25,
                block_size=16,
                eliminated=eliminated,
                segment_loss_tokens=0,
            ),
        )
        saved[eliminated] = saved_activation_bytes(model, {"input_ids": ids, "labels": ids}).total
        index_bytes = sum(s.eliminated.numel() * 8 for s in lemo_state(model).selections.values())
    assert saved["frozen"] == saved["skip"] + index_bytes
    dense = saved_activation_bytes(copy.deepcopy(base), {"input_ids": ids, "labels": ids}).total
    assert saved["frozen"] < 0.9 * dense
