"""Ulysses sequence parallelism (2 gloo processes on CPU) against single-process LeMo."""

import pytest
import torch
import torch.distributed as dist

from lemo import LeMoConfig, apply_lemo, lemo_state, remove_lemo
from lemo.apply import LeMoLayer
from lemo.distributed import sp_scoring
from lemo.distributed.data_parallel import enable_checkpointing
from lemo.distributed.sequence import (
    SequenceParallelLayer,
    apply_sequence_parallel,
    sequence_parallel_loss,
    shard_sequence,
    sync_gradients,
)
from lemo.kernels.block_scores import block_scores_torch
from lemo.scoring import project_qk
from tests.distributed import spawn
from tests.helpers import assert_grads_close, lora_grads, tiny_lora_model

LENGTH, BLOCK = 256, 16  # 16 blocks, 8 per rank


def _ids():
    return torch.randint(0, 512, (1, LENGTH), generator=torch.Generator().manual_seed(3))


def _config(mlp_mode):
    return LeMoConfig(
        shared_selection=False,
        loss_tokens="all",
        sparse_first=None,
        keep_ratio=0.4,
        block_size=BLOCK,
        segment_loss_tokens=64,
        mlp_mode=mlp_mode,
    )


def _sp_worker(rank, world, name, mlp_mode, checkpointing):
    ids = _ids()
    ref = tiny_lora_model(name)
    apply_lemo(ref, _config(mlp_mode))
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ref_kept = {i: s.kept_blocks for i, s in lemo_state(ref).selections.items()}

    model = tiny_lora_model(name)
    apply_lemo(model, _config(mlp_mode))
    apply_sequence_parallel(model)
    if checkpointing:
        enable_checkpointing(model)
    calls = []
    score = sp_scoring.sequence_block_scores
    sp_scoring.sequence_block_scores = lambda *a, **k: calls.append(1) or score(*a, **k)

    loss = sequence_parallel_loss(model, shard_sequence(ids), segment=64)
    n_scored = len(calls)
    loss.backward()
    sync_gradients(model)
    assert len(calls) == n_scored == len(ref_kept), "scoring ran again during backward (recomputation)"

    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    sel = lemo_state(model).selections
    assert sel.keys() == ref_kept.keys()
    for i, s in sel.items():
        assert torch.equal(s.kept_blocks, ref_kept[i]), f"layer {i}: kept blocks differ from one process"
        assert 0 < int(s.kept_blocks.sum()) < s.kept_blocks.numel()
    assert_grads_close(lora_grads(model), lora_grads(ref), rtol=1e-4, atol=1e-6)

    layers = model.base_model.model.model.layers  # remove_lemo undoes the dense layers' wrapping too
    assert all(isinstance(layer, SequenceParallelLayer) for layer in layers)
    remove_lemo(model)
    assert not any(isinstance(layer, LeMoLayer) for layer in layers)
    assert all("forward" not in vars(layer.mlp) for layer in layers)


@pytest.mark.parametrize(
    "name,mlp_mode,checkpointing",
    [
        ("llama3-tiny", "token", True),  # GQA: 4 query heads, 2 KV heads -> 2 + 1 per rank
        ("llama2-tiny", "channel", False),
    ],
)
def test_sequence_parallel_equals_one_process(name, mlp_mode, checkpointing):
    spawn(_sp_worker, name, mlp_mode, checkpointing)


def _scores_worker(rank, world):
    """The split over query blocks gives the exact scores; a split over heads would not."""
    from lemo.models.adapters import get_adapter

    length = 384  # 3 ranks x 8 blocks: rank 2 scores against two earlier slices
    model = tiny_lora_model("llama3-tiny")
    decoder = model.base_model.model.model
    parts = get_adapter("llama").parts(decoder.layers[1])
    hidden = torch.randn(1, length, 64, generator=torch.Generator().manual_seed(5))
    pe = decoder.rotary_emb(hidden, torch.arange(length)[None])
    q, k = project_qk(parts, hidden, pe)
    _, full = block_scores_torch(q, k, block_size=BLOCK, scale=parts.scaling, return_map=False)
    part = slice(rank * length // world, (rank + 1) * length // world)
    got = sp_scoring.sequence_block_scores(parts, hidden[:, part], (pe[0][:, part], pe[1][:, part]), BLOCK)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    # per-head-group scores (2 query heads + 1 KV head each), summed: an upper bound, not the scores
    by_heads = sum(
        block_scores_torch(
            q[:, 2 * g : 2 * g + 2], k[:, g : g + 1], block_size=BLOCK, scale=parts.scaling, return_map=False
        )[1]
        * 2
        / 4
        for g in range(2)
    )
    assert (by_heads >= full - 1e-6).all() and not torch.allclose(by_heads, full, rtol=1e-3)


def test_sequence_block_scores_equal_one_process():
    spawn(_scores_worker, world=3)


def _layer_worker(rank, world, kept_blocks):
    """One sparse layer with a given selection, uneven over the ranks (even none on a rank): output,
    input gradient and LoRA gradients equal lemo.elimination.sparse_layer in one process."""
    from lemo.distributed.sequence import local_selection, sequence_parallel_layer
    from lemo.elimination import sparse_layer
    from lemo.models.adapters import get_adapter
    from lemo.selection import tokens_from_blocks

    model = tiny_lora_model("llama3-tiny")
    decoder = model.base_model.model.model
    parts = get_adapter("llama").parts(decoder.layers[1])
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(1, LENGTH, 64, generator=gen)
    weight = torch.randn(1, LENGTH, 64, generator=gen)
    pe = decoder.rotary_emb(hidden, torch.arange(LENGTH)[None])
    kept = torch.zeros(1, LENGTH // BLOCK, dtype=torch.bool)
    kept[0, kept_blocks] = True

    ref_in = hidden.clone().requires_grad_(True)
    sel = tokens_from_blocks(kept, torch.zeros(1, LENGTH, dtype=torch.int32), BLOCK)
    ref = sparse_layer(parts, ref_in, sel, pe, mlp_mode="token")
    (ref * weight).sum().backward()
    ref_grads = lora_grads(model)
    model.zero_grad(set_to_none=True)

    part = slice(rank * LENGTH // world, (rank + 1) * LENGTH // world)
    local_in = hidden[:, part].clone().requires_grad_(True)
    sp_sel = local_selection(kept, rank, world, BLOCK)
    out = sequence_parallel_layer(parts, local_in, sp_sel, (pe[0][:, part], pe[1][:, part]), mlp_mode="token")
    (out * weight[:, part]).sum().backward()
    sync_gradients(model)
    torch.testing.assert_close(out, ref[:, part].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local_in.grad, ref_in.grad[:, part], rtol=1e-5, atol=1e-6)
    assert_grads_close(lora_grads(model), ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kept_blocks", [[0, 2, 3], [1, 6, 8, 9, 10, 15]], ids=["rank1-keeps-nothing", "uneven"])
def test_sequence_parallel_layer_equals_sparse_layer(kept_blocks):
    spawn(_layer_worker, kept_blocks)
