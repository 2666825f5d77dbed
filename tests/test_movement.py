"""Permutation-free movement kernels (lemo.kernels.movement) against their torch references (fp32; on CPU
through the Triton interpreter), and movement_kernel="triton" against "torch" on whole models."""

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo.bench.measure import count_saved_bytes
from lemo.kernels import movement as mv
from lemo.models.adapters import unwrap
from lemo.models.registry import build_model
from lemo_baselines.attention import attention_context
from lemo_baselines.lora import apply_lora
from tests.helpers import assert_grads_close, lora_grads, tiny_lora_model

TOL = dict(rtol=1e-5, atol=1e-5)


def _index(kind, n, block=8):
    """Kept rows of n: as the selection makes them (sorted, whole blocks) and awkward variants."""
    if kind == "empty":
        return torch.zeros(0, dtype=torch.long)
    if kind == "full":
        return torch.arange(n)
    if kind == "single":
        return torch.tensor([n // 3])
    if kind == "one_block":
        return torch.arange(block, min(n, 2 * block))
    blocks = torch.randperm(-(-n // block))[: max(1, n // (2 * block))]
    index = (blocks[:, None] * block + torch.arange(block)).reshape(-1)
    index = index[index < n].sort().values
    return index[torch.randperm(index.numel())] if kind == "unsorted" else index


KINDS = ["empty", "full", "single", "one_block", "sorted", "unsorted"]
SHAPES = [(1, 37, 96), (2, 131, 200), (3, 50, 64)]  # (B, L, D): D not a power of two; N odd


def _grads(out, inputs, grad):
    inputs = [x for x in inputs if x.requires_grad]
    return torch.autograd.grad(out, inputs, grad, allow_unused=True) if out.numel() else [None] * len(inputs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train_weight", [False, True])
def test_load_rms_norm_matches_reference(shape, kind, train_weight):
    b, length, d = shape
    base = torch.randn(b, length, d, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(d)).requires_grad_(train_weight)
    index = _index(kind, b * length)
    out = mv.load_rms_norm(base, index, weight, 1e-5)
    ref = mv.load_rms_norm_reference(base, index, weight, 1e-5)
    assert out.shape == (index.numel(), d)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(ref)
    got, want = _grads(out, [base, weight], g), _grads(ref, [base, weight], g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **TOL)
    if kind == "empty":  # backward through an empty selection: zero gradient of the right shape
        (grad,) = torch.autograd.grad(out.sum() + base.sum(), base)
        torch.testing.assert_close(grad, torch.ones_like(base))


def test_load_rms_norm_zero_and_tiny_weights_use_saved_columns():
    """out / w cannot give back the normalised value where w is zero or subnormal: those columns are saved."""
    d = 96
    base = torch.randn(2, 40, d, requires_grad=True)
    weight = 1 + 0.3 * torch.randn(d)
    weight[[0, 7, 95]] = 0.0
    weight[50] = 1e-40  # subnormal in fp32
    weight.requires_grad_(True)
    index = _index("unsorted", 80)
    out = mv.load_rms_norm(base, index, weight, 1e-6)
    ref = mv.load_rms_norm_reference(base, index, weight, 1e-6)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(ref)
    for a, w in zip(_grads(out, [base, weight], g), _grads(ref, [base, weight], g)):
        torch.testing.assert_close(a, w, **TOL)


def test_load_rms_norm_saves_no_gathered_copy():
    """Saved: index + rstd (K fp32) + its output, which a following (LoRA) projection keeps anyway."""
    b, length, d = 1, 100, 96
    base = torch.randn(b, length, d, requires_grad=True) * 1.0
    proj = torch.nn.Linear(d, 16, bias=False)  # trainable: keeps its input
    proj.register_parameter("norm_w", torch.nn.Parameter(torch.ones(d), requires_grad=False))
    norm_w = proj.norm_w
    index = _index("sorted", b * length)
    k = index.numel()
    with count_saved_bytes(proj) as ref_saved:
        proj(mv.load_rms_norm_reference(base, index, norm_w, 1e-5))
    with count_saved_bytes(proj) as saved:
        proj(mv.load_rms_norm(base, index, norm_w, 1e-5))
    assert saved.total == 8 * k + 4 * k + 4 * k * d  # index, rstd, output (shared with the projection)
    assert ref_saved.total - saved.total == 4 * k * d  # the reference also keeps the gathered rows


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_add_rows_in_place_matches_reference(shape, kind):
    b, length, d = shape
    leaf = torch.randn(b, length, d, requires_grad=True)
    index = _index(kind, b * length)
    rows = torch.randn(index.numel(), d, requires_grad=True)
    base = leaf * 1.0
    ptr, version = base.data_ptr(), base._version
    out = mv.add_rows_(base, index, rows)
    assert out is base and out.data_ptr() == ptr and base._version > version  # in place
    ref = mv.add_rows_reference(leaf * 1.0, index, rows)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    for a, w in zip(_grads(out, [leaf, rows], g), _grads(ref, [leaf, rows], g)):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


def test_add_rows_saves_only_the_index_and_mutating_a_saved_tensor_is_an_error():
    leaf = torch.randn(1, 50, 96, requires_grad=True)
    index = _index("sorted", 50)
    rows = torch.randn(index.numel(), 96, requires_grad=True)
    base = leaf * 1.0
    with count_saved_bytes() as saved:
        mv.add_rows_(base, index, rows)
    assert saved.total == 8 * index.numel()
    base = leaf * 1.0
    y = base.pow(2)  # saves base
    mv.add_rows_(base, index, rows)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + base.sum()).backward()


def test_add_rows_into_a_tensor_that_needs_no_grad():
    """E.g. the first sparse layer behind frozen layers: the output then requires grad through the rows."""
    base = torch.randn(2, 10, 8)
    index = torch.tensor([3, 11, 2])
    rows = torch.randn(3, 8, requires_grad=True)
    out = mv.add_rows_(mv.writable_residual(base), index, rows)
    assert out is base and out.requires_grad
    g = torch.randn(2, 10, 8)
    torch.testing.assert_close(torch.autograd.grad(out, rows, g)[0], g.view(-1, 8)[index], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["empty", "full", "single", "unsorted"])
def test_load_rows_matches_index_select(kind):
    base = torch.randn(2, 77, 200, requires_grad=True)
    index = _index(kind, 154)
    out = mv.load_rows(base, index)
    ref = mv.load_rows_reference(base, index)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    for a, w in zip(_grads(out, [base], g), _grads(ref, [base], g)):
        if w is not None:
            torch.testing.assert_close(a, w, rtol=0, atol=0)


@pytest.mark.parametrize("heads, hd", [(4, 16), (3, 24), (5, 10)])  # hd/2 not a power of two
@pytest.mark.parametrize("table_batch", [1, 2])
@pytest.mark.parametrize("kind", ["empty", "full", "single", "unsorted", "sorted"])
def test_rope_rows_matches_reference(heads, hd, table_batch, kind):
    b, length = 2, 45
    cos, sin = torch.randn(table_batch, length, hd), torch.randn(table_batch, length, hd)
    index = _index(kind, b * length)
    x = torch.randn(index.numel(), heads, hd, requires_grad=True)
    out = mv.rope_rows(x, cos, sin, index, length)
    ref = mv.rope_rows_reference(x, cos, sin, index, length)
    torch.testing.assert_close(out, ref, **TOL)
    if index.numel():
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], **TOL)


def test_rope_rows_accepts_strided_input():
    """q comes from a projection as (T, H * hd) viewed (T, H, hd); a transposed layout works too."""
    length, hd = 33, 12
    cos, sin = torch.randn(1, length, hd), torch.randn(1, length, hd)
    index = _index("unsorted", length, block=4)
    x = torch.randn(3, index.numel(), hd).transpose(0, 1).requires_grad_()
    torch.testing.assert_close(
        mv.rope_rows(x, cos, sin, index, length), mv.rope_rows_reference(x, cos, sin, index, length), **TOL
    )


def test_writable_residual_in_place_only_where_nothing_can_see_it():
    leaf = torch.randn(2, 10, 8, requires_grad=True)
    h = leaf * 2.0
    assert mv.writable_residual(h) is h  # plain autograd: written in place
    assert mv.writable_residual(leaf) is not leaf  # leaf requiring grad
    view = h[:, 1:]  # a view: writing through it would make autograd clone the whole gradient (CopySlices)
    out = mv.writable_residual(view)
    assert out is not view and not out._is_view() and out.is_contiguous()
    torch.testing.assert_close(out, view)
    assert mv.writable_residual(h.transpose(0, 1)).is_contiguous()
    with torch.no_grad():  # reentrant checkpointing runs its forward like this and keeps the input
        assert mv.writable_residual(h) is not h
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # checkpointing, offloading
        assert mv.writable_residual(h) is not h


# ---- whole models -------------------------------------------------------------------------------


def _run(name, movement, mlp_mode, checkpointing, ids, **cfg):
    torch.manual_seed(0)
    model = tiny_lora_model(name)
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    apply_lemo(
        model,
        LeMoConfig(
            keep_ratio=0.5,
            block_size=16,
            sparse_layers=[1, 2],
            mlp_mode=mlp_mode,
            segment_loss_tokens=0,
            movement_kernel=movement,
            compact_stream=False,  # per-layer row movement is what these tests measure
            **cfg,
        ),
    )
    with attention_context("sdpa-math"):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    return out.loss.detach(), lora_grads(model), lemo_state(model).selections


@pytest.mark.parametrize("name", ["llama2-tiny", "llama3-tiny"])
@pytest.mark.parametrize("mlp_mode", ["token", "channel"])
@pytest.mark.parametrize("checkpointing", [False, "non-reentrant", "reentrant"])
def test_triton_movement_matches_torch_movement(name, mlp_mode, checkpointing, monkeypatch):
    ids = torch.randint(0, 512, (2, 150))
    wrote = []
    original = mv.writable_residual
    monkeypatch.setattr(mv, "writable_residual", lambda h: wrote.append(original(h) is h) or original(h))
    loss, grads, sel = _run(name, "triton", mlp_mode, checkpointing, ids)
    ref_loss, ref_grads, ref_sel = _run(name, "torch", mlp_mode, checkpointing, ids)
    assert set(sel) == {1, 2} and all(torch.equal(sel[i].index, ref_sel[i].index) for i in sel)
    assert all(0 < s.total < ids.numel() for s in sel.values())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    # without checkpointing the layers add into their input; with it they add into one clone each
    assert wrote and all(w == (not checkpointing) for w in wrote), wrote


@pytest.mark.parametrize("name", ["qwen2.5-tiny", "opt-tiny"])
def test_triton_movement_other_families(name):
    """Qwen2 (fused RMSNorm, qkv bias) and OPT (LayerNorm: Triton gather + the module, no RoPE)."""
    ids = torch.randint(0, 512, (1, 130))
    loss, grads, _ = _run(name, "triton", "token", False, ids)
    ref_loss, ref_grads, _ = _run(name, "torch", "token", False, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_triton_movement_padded_and_packed_batches(mode):
    """Ragged segments and per-row positions: RoPE reads cos/sin of (B, L, hd) tables at flat positions."""
    ids = torch.randint(0, 512, (2, 150))
    batch = {"input_ids": ids, "labels": ids}
    if mode == "padded":
        mask = torch.ones(2, 150, dtype=torch.long)
        mask[1, 101:] = 0
        batch.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    else:
        batch["position_ids"] = torch.cat([torch.arange(60), torch.arange(90)])[None].expand(2, -1)
    results = {}
    for movement in ("torch", "triton"):
        torch.manual_seed(0)
        model = tiny_lora_model("llama3-tiny")
        apply_lemo(
            model,
            LeMoConfig(
                keep_ratio=0.4,
                block_size=16,
                sparse_layers=[1, 2],
                segment_loss_tokens=0,
                movement_kernel=movement,
                compact_stream=False,
            ),
        )
        with attention_context("sdpa-math"):
            loss = model(**batch).loss
            loss.backward()
        results[movement] = loss.detach(), lora_grads(model)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    assert_grads_close(results["triton"][1], results["torch"][1], rtol=1e-4, atol=1e-6)


def test_checkpointing_with_a_mutated_input_is_an_error_not_a_wrong_gradient(monkeypatch):
    """Were the checkpointed input written in place, recomputation would start from the wrong values:
    the checkpoint's saved input has a version counter, so backward fails instead."""
    monkeypatch.setattr(mv, "writable_residual", lambda h: h)
    ids = torch.randint(0, 512, (1, 100))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _run("llama2-tiny", "triton", "token", "non-reentrant", ids)


def test_peft_applied_after_lemo_with_triton_movement():
    ids = torch.randint(0, 512, (1, 130))
    grads = {}
    for movement in ("torch", "triton"):
        torch.manual_seed(0)
        base = build_model("llama3-tiny", dtype=torch.float32)
        apply_lemo(
            base,
            LeMoConfig(
                keep_ratio=0.5,
                block_size=16,
                sparse_layers=[1, 2],
                segment_loss_tokens=0,
                movement_kernel=movement,
                compact_stream=False,
            ),
        )
        model = apply_lora(base)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(n) % 2**31))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[movement] = lora_grads(model)
    assert_grads_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("name", ["llama2-tiny", "llama3-tiny"])
@pytest.mark.parametrize("mlp_mode", ["token", "channel"])
def test_triton_movement_saves_fewer_bytes(name, mlp_mode, recompute):
    """Per sparse layer the gathered cos/sin (2 x K x hd) are no longer saved (RoPE keeps the full tables,
    which the dense layers keep anyway). Without lora_norm_recompute the gathered input of the attention
    norm (K x D) goes too: the fused norm keeps its output, which lora_A keeps anyway; with it the torch
    path already keeps only one of the two."""
    ids = torch.randint(0, 512, (1, 300))
    totals, kept = {}, None
    for movement in ("torch", "triton"):
        torch.manual_seed(0)
        model = tiny_lora_model(name)
        apply_lemo(
            model,
            LeMoConfig(
                keep_ratio=0.4,
                block_size=16,
                sparse_layers=[1, 2],
                mlp_mode=mlp_mode,
                segment_loss_tokens=0,
                movement_kernel=movement,
                compact_stream=False,  # per-layer row movement is what these tests measure
                lora_norm_recompute=recompute,
            ),
        )
        with attention_context("sdpa-flash"), count_saved_bytes(model) as saved:
            model(input_ids=ids, labels=ids)
        totals[movement] = saved.total
        kept = [s.total for s in lemo_state(model).selections.values()]
    cfg = unwrap(model).config
    drop = sum((0 if recompute else k * cfg.hidden_size * 4) + 2 * k * cfg.head_dim * 4 for k in kept)
    assert totals["triton"] == totals["torch"] - drop
