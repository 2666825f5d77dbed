"""Saved-for-backward bytes of sparse layers fall exactly as the keep schedule predicts."""

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo.bench.measure import count_saved_bytes
from lemo.models.adapters import get_adapter, unwrap
from lemo_baselines.attention import attention_context
from tests.helpers import tiny_lora_model


def _per_layer_bytes(model, ids):
    lm = unwrap(model)
    layers = get_adapter(lm.config.model_type).decoder(lm).layers
    with attention_context("sdpa-flash"):  # saves q, k, v, out, lse: linear in tokens
        with count_saved_bytes(model, {i: layer for i, layer in enumerate(layers)}) as saved:
            model(input_ids=ids, labels=ids)
    return saved


@pytest.mark.parametrize("name", ["llama2-tiny", "llama3-tiny", "opt-tiny"])
def test_sparse_layer_bytes_scale_with_kept_tokens(name):
    length = 300
    ids = torch.randint(0, 512, (1, length))
    model = tiny_lora_model(name)
    dense = _per_layer_bytes(model, ids)
    apply_lemo(
        model,
        LeMoConfig(
            shared_selection=False,
            loss_tokens="all",
            sparse_first=None,
            keep_ratio=0.4,
            block_size=16,
            mlp_mode="token",
            segment_loss_tokens=0,
            efficient_norm=False,
        ),
    )
    sparse = _per_layer_bytes(model, ids)
    sel = lemo_state(model).selections
    assert set(sel) == {1, 2}
    for i in range(4):
        if i in sel:
            kept = sel[i].total
            assert kept < length
            # every saved activation is per kept token; plus the kept-token index (int64)
            assert sparse.by_module[i] == dense.by_module[i] * kept // length + 8 * kept, i
        else:
            assert sparse.by_module[i] == dense.by_module[i], i
    saving = sum(dense.by_module[i] - sparse.by_module[i] for i in sel)
    # RoPE's cos/sin are one tensor pair shared by every dense layer (in each layer's count, once in the
    # total); a sparse layer gathers its own kept rows instead.
    lm = unwrap(model)
    shared = 0 if lm.config.model_type == "opt" else 2 * length * lm.config.head_dim * 4
    assert dense.total - sparse.total == saving - len(sel) * shared
