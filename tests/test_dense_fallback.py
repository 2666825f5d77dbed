"""LeMoConfig.min_sparse_tokens is a true dense fallback: a training forward shorter than it is plain PEFT
LoRA (the same loss, gradients and saved tensors, none of LeMo's code run); at or above it LeMo runs as
with min_sparse_tokens=0.

Comparisons are bitwise (torch.equal): below the threshold every module runs the forward LeMo replaced,
the same operations in the same order on the same inputs, so not even fp32 rounding may differ."""

import collections
import copy

import pytest
import torch

import lemo.apply
import lemo.lora_norm
from lemo import LeMoConfig, apply_lemo, lemo_state, remove_lemo
from lemo.apply import LeMoLayer, PinnedCheckpoint
from tests.helpers import assert_grads_close, lora_grads, tiny_lora_model

LENGTH = 96  # 6 blocks of 16


def _configs():
    # block_size 16: the tiny models' sequences hold several blocks; the segment loss runs in 2+ segments.
    return {
        "paper": LeMoConfig.paper(block_size=16, segment_loss_tokens=32),  # channel MLP in every layer
        "default": LeMoConfig(block_size=16, segment_loss_tokens=32),  # token MLP, shared selection, kept loss
    }


CONFIGS = list(_configs())


def _ids(length=LENGTH, seed=0, batch=2):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _saved_signature():
    """A saved_tensors_hooks context and the (shape, dtype) of every tensor saved for backward in it."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), saved


def _step(model, ids):
    """Loss, LoRA gradients and the sorted signature of the tensors saved for backward."""
    model.zero_grad(set_to_none=True)
    hooks, saved = _saved_signature()
    with hooks:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model), sorted(saved, key=str)


def _assert_same(a, b):
    loss_a, grads_a, saved_a = a
    loss_b, grads_b, saved_b = b
    assert torch.equal(loss_a, loss_b), (loss_a.item(), loss_b.item())
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert saved_a == saved_b


@pytest.fixture
def lemo_calls(monkeypatch):
    """Counts calls of LeMo's code: its norm, channel MLP, LoRA A, selection (scoring) and loss."""
    calls = collections.Counter()

    def spy(owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    # apply_lemo binds these names when it patches; patch_lora_a binds lora_a_forward in the first forward
    for name in ("channel_pruned_forward", "rms_norm_forward", "segmented_lm_loss", "kept_everywhere"):
        spy(lemo.apply, name)
    spy(lemo.lora_norm, "lora_a_forward")
    spy(LeMoLayer, "select")
    return calls


def _plain_lora_then_lemo(config, checkpointing):
    model = tiny_lora_model("llama2-tiny")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, apply_lemo(copy.deepcopy(model), config)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_below_min_sparse_tokens_a_step_is_plain_lora(name, checkpointing, lemo_calls):
    config = _configs()[name]
    config.min_sparse_tokens = LENGTH + 1
    lora, model = _plain_lora_then_lemo(config, checkpointing)
    ids = _ids()
    _assert_same(_step(model, ids), _step(lora, ids))  # loss, every LoRA gradient, every saved tensor
    assert lemo_state(model).selections == {} and not lemo_calls, dict(lemo_calls)

    # The spies see LeMo when it runs: the same model at min_sparse_tokens=0.
    config.min_sparse_tokens = 0
    _step(model, ids)
    assert lemo_state(model).selections
    expected = {"rms_norm_forward", "lora_a_forward", "select", "segmented_lm_loss"}
    expected |= {"channel_pruned_forward"} if name == "paper" else {"kept_everywhere"}
    assert expected <= set(lemo_calls), dict(lemo_calls)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_at_min_sparse_tokens_lemo_runs_as_without_the_threshold(name, checkpointing):
    config = _configs()[name]
    _, model = _plain_lora_then_lemo(config, checkpointing)
    ids = _ids()
    config.min_sparse_tokens = 0
    always = _step(model, ids)
    always_kept = {i: s.kept_blocks.clone() for i, s in lemo_state(model).selections.items()}
    config.min_sparse_tokens = LENGTH  # not shorter: sparse
    _assert_same(_step(model, ids), always)
    kept = {i: s.kept_blocks for i, s in lemo_state(model).selections.items()}
    assert kept.keys() == always_kept.keys() and kept
    assert all(torch.equal(kept[i], always_kept[i]) for i in kept)


@pytest.mark.parametrize("name", CONFIGS)
def test_checkpoint_recomputation_keeps_its_forwards_decision(name):
    """A short (dense) and a long (sparse) forward, then one backward through both: each layer recomputed in
    backward runs as in its own forward, not as in the latest one."""
    config = _configs()[name]
    config.min_sparse_tokens = LENGTH
    _, model = _plain_lora_then_lemo(config, checkpointing=True)
    short, long = _ids(LENGTH - 16, seed=1), _ids(LENGTH, seed=2)

    model.zero_grad(set_to_none=True)
    model(input_ids=short, labels=short).loss.backward()
    model(input_ids=long, labels=long).loss.backward()
    separate = lora_grads(model)

    model.zero_grad(set_to_none=True)
    dense_loss = model(input_ids=short, labels=short).loss
    sparse_loss = model(input_ids=long, labels=long).loss
    assert lemo_state(model).selections  # the latest forward was sparse
    (dense_loss + sparse_loss).backward()
    assert_grads_close(lora_grads(model), separate, rtol=1e-6, atol=1e-7)  # summed in another order

    remove_lemo(model)
    assert not any(
        isinstance(getattr(m, "_gradient_checkpointing_func", None), PinnedCheckpoint) for m in model.modules()
    )


def test_below_min_sparse_tokens_lemo_over_liger_is_lora_liger(lemo_calls):
    from lemo_baselines.liger import apply_liger, remove_liger

    from .liger_interpret import liger_on_this_machine

    liger_on_this_machine()
    length = 32  # Triton's interpreter on CPU: few rows
    model = apply_liger(tiny_lora_model("llama2-tiny"))
    ids = _ids(length, batch=1)
    lora_liger = _step(model, ids)
    apply_lemo(model, LeMoConfig.paper(block_size=16, segment_loss_tokens=32, min_sparse_tokens=length + 1))
    # Liger's norms, SwiGLU MLPs and fused linear cross-entropy run, not LeMo's replacements of them.
    _assert_same(_step(model, ids), lora_liger)
    assert lemo_state(model).selections == {} and not lemo_calls, dict(lemo_calls)
    remove_lemo(model)
    remove_liger(model)


def test_channel_mlps_ranked_over_ranks_do_not_fall_back(monkeypatch):
    """With channels ranked over data-parallel ranks every MLP call is a collective: a rank whose batch is short
    must not skip it while another's is long, so those MLPs stay channel-pruned (the rest falls back)."""
    import lemo.distributed.channel as channel

    reduced, norms = [], []

    def all_reduce(tensor, group=None):  # one process: the sum over the group is the tensor
        reduced.append(tensor.shape)
        return tensor

    monkeypatch.setattr(channel, "_all_reduce", all_reduce)
    monkeypatch.setattr(lemo.apply, "rms_norm_forward", lambda *a, **k: norms.append(1))  # must not run
    model = apply_lemo(tiny_lora_model("llama2-tiny"), LeMoConfig.paper(block_size=16, min_sparse_tokens=LENGTH + 1))
    assert channel.rank_channels_globally(model) == 4
    _step(model, _ids())
    assert len(reduced) == 4 and not norms and lemo_state(model).selections == {}


def test_checkpointing_enabled_after_apply_survives_remove_lemo():
    """Layers restored by remove_lemo keep the checkpoint function transformers gave their wrappers."""
    model = tiny_lora_model("llama2-tiny")
    apply_lemo(model, LeMoConfig(sparse_first=0, block_size=16))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    remove_lemo(model)
    ids = torch.randint(0, 512, (1, 64))
    model(input_ids=ids, labels=ids).loss.backward()


def test_lora_added_after_apply_is_routed_at_the_first_sparse_forward():
    """Dense forwards skip the walk that finds PEFT's lora_A Linears; the first sparse forward still finds them."""
    from lemo.models.registry import build_model
    from lemo_baselines.lora import apply_lora

    model = build_model("llama2-tiny", dtype=torch.float32)
    apply_lemo(model, LeMoConfig(sparse_first=0, block_size=16, min_sparse_tokens=64))
    model = apply_lora(model)
    model.train()
    handle = lemo.apply.unwrap(model)._lemo
    ids = torch.randint(0, 512, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    assert not handle.lora_a  # dense: nothing routed through lemo.lora_norm
    ids = torch.randint(0, 512, (1, 96))
    model(input_ids=ids, labels=ids).loss.backward()
    assert handle.lora_a and lemo_state(model).selections
