"""DDP and FSDP2 (2 gloo processes on CPU) against one process on the concatenated batch."""

import copy

import pytest
import torch
import torch.distributed as dist

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo.distributed.adapter_io import load_adapter, peft_model, save_adapter, trainable_state
from lemo.distributed.data_parallel import broadcast_parameters, enable_checkpointing, shard_fsdp2, wrap_ddp
from tests.distributed import spawn
from tests.helpers import assert_grads_close, lora_grads, tiny_lora_model

CONFIG = LeMoConfig(keep_ratio=0.4, block_size=16, segment_loss_tokens=64)
# llama3-tiny: GQA, token MLP, checkpointing; llama2-tiny: channel MLP (its autograd Function saves the
# frozen MLP weights for backward, which FSDP2 must have unsharded again by then), no checkpointing.
CASES = [("llama3-tiny", True), ("llama2-tiny", False)]
LENGTH = 160  # 10 blocks: 4 kept per sparse layer


def _batch(world):
    return torch.randint(0, 512, (world, LENGTH), generator=torch.Generator().manual_seed(7))


def _model(name, checkpointing):
    model = tiny_lora_model(name)
    config = copy.deepcopy(CONFIG)
    config.mlp_mode = "token" if checkpointing else "channel"
    apply_lemo(model, config)
    if checkpointing:
        enable_checkpointing(model)
    return model


def _reference(name, ids, checkpointing):
    """One process, whole batch: loss, LoRA gradients, kept blocks per sparse layer, model after one SGD step."""
    model = _model(name, checkpointing)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    kept = {i: s.kept_blocks.clone() for i, s in lemo_state(model).selections.items()}
    grads = lora_grads(model)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    return loss.detach(), grads, kept, model


def _perturb_adapters(model, rank):
    """Adapters that differ from rank 0's on other ranks, as from unseeded PEFT init: the broadcast from
    rank 0 must undo this."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * rank)


def _check_step(rank, world, model, ref, ids, grads_of):
    ref_loss, ref_grads, ref_kept, _ = ref
    local = ids[rank : rank + 1]
    loss = model(input_ids=local, labels=local).loss
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / world, ref_loss, rtol=1e-5, atol=1e-6)
    sel = lemo_state(peft_model(model)).selections  # DDP wraps; FSDP2 does not
    assert sel.keys() == ref_kept.keys() and sel
    for i, s in sel.items():  # selection is per sequence: this rank's row keeps what one process keeps
        assert torch.equal(s.kept_blocks[0], ref_kept[i][rank]), f"layer {i}: kept blocks differ"
        assert 0 < int(s.kept_blocks.sum()) < s.kept_blocks.numel()
    assert_grads_close(grads_of(model), ref_grads, rtol=1e-4, atol=1e-6)


def _ddp_worker(rank, world, name, checkpointing):
    ids = _batch(world)
    ref = _reference(name, ids, checkpointing)
    model = _model(name, checkpointing)
    _perturb_adapters(model, rank)  # DDP broadcasts rank 0's parameters at construction
    ddp = wrap_ddp(model)
    _check_step(rank, world, ddp, ref, ids, lambda m: lora_grads(m.module))


@pytest.mark.parametrize("name,checkpointing", CASES)
def test_ddp_equals_one_process_on_the_whole_batch(name, checkpointing):
    spawn(_ddp_worker, name, checkpointing)


def _fsdp2_worker(rank, world, name, checkpointing, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    ids = _batch(world)
    ref = _reference(name, ids, checkpointing)
    model = _model(name, checkpointing)
    _perturb_adapters(model, rank)
    broadcast_parameters(model)
    shard_fsdp2(model, mesh=init_device_mesh("cpu", (world,)))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(isinstance(p, DTensor) for p in frozen), "frozen base weights are not sharded"

    def full_grads(m):
        return {n: p.grad.full_tensor() for n, p in m.named_parameters() if p.requires_grad}

    _check_step(rank, world, model, ref, ids, full_grads)
    assert all(p.grad is None for p in frozen)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()

    # Adapter-only checkpoint: rank 0 writes PEFT files; they hold the stepped adapters and nothing else.
    save_adapter(model, tmp)
    stepped = trainable_state(ref[3])
    fresh = tiny_lora_model(name, seed=3)  # different adapters (and base) until loaded
    load_adapter(fresh, tmp)
    assert_grads_close(trainable_state(fresh), stepped, rtol=1e-5, atol=1e-6)
    # ... and back into a sharded model.
    _perturb_adapters(model, rank + 1)
    load_adapter(model, tmp)
    assert_grads_close(trainable_state(model), stepped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,checkpointing", CASES)
def test_fsdp2_equals_one_process_and_saves_adapters(name, checkpointing, tmp_path):
    spawn(_fsdp2_worker, name, checkpointing, str(tmp_path))
