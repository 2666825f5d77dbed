"""The same properties in bf16 on a CUDA GPU (skipped elsewhere): kernels and the sparse path."""

import pytest
import torch

from lemo import LeMoConfig, apply_lemo
from lemo.kernels.block_scores import block_scores, block_scores_reference, block_scores_torch
from lemo.models.registry import build_model
from lemo.segment_loss import segmented_lm_loss
from lemo_baselines.attention import attention_context

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("b, hq, hkv, length, d", [(1, 32, 32, 1000, 128), (2, 32, 8, 4097, 128), (1, 4, 2, 77, 64)])
def test_block_scores_bf16_matches_fp32_reference(b, hq, hkv, length, d):
    q = torch.randn(b, hq, length, d, device="cuda")
    k = torch.randn(b, hkv, length, d, device="cuda")
    ref = block_scores_reference(q.double().cpu(), k.double().cpu()).cuda().float()
    bf16_torch_err = _rel(block_scores_reference(q.bfloat16(), k.bfloat16()), ref)
    bmap, colsum = block_scores(q.bfloat16(), k.bfloat16())
    assert torch.isfinite(bmap).all()
    # a bf16 kernel passes when its error is at most ~2x that of plain torch in bf16
    assert _rel(bmap, ref) <= 2 * bf16_torch_err + 1e-6
    assert _rel(colsum, ref.sum(1)) <= 2 * bf16_torch_err + 1e-6
    tmap, _ = block_scores_torch(q.bfloat16(), k.bfloat16())
    assert _rel(tmap, ref) <= 2 * bf16_torch_err + 1e-6


def test_lemo_keep_one_equals_dense_in_bf16():
    model = build_model("llama3-tiny", device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (1, 1000), device="cuda")
    model.train()
    with attention_context("sdpa-flash"):
        ref = model(input_ids=ids, labels=ids).loss.float()
        apply_lemo(model, LeMoConfig(keep_ratio=1.0, segment_loss_tokens=256))
        got = model(input_ids=ids, labels=ids).loss.float()
    assert abs(got.item() - ref.item()) <= 1e-2 * abs(ref.item())


def test_lemo_sparse_runs_with_triton_scores_and_checkpointing():
    model = build_model("llama2-tiny", device="cuda", dtype=torch.bfloat16)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[1].self_attn.q_proj.weight.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_lemo(model, LeMoConfig(keep_ratio=0.4, mlp_mode="channel", kernels="triton"))
    ids = torch.randint(0, 512, (2, 3000), device="cuda")
    with attention_context("sdpa-flash"):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    g = model.model.layers[1].self_attn.q_proj.weight.grad
    assert torch.isfinite(loss) and g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_segment_loss_bf16_matches_plain():
    h = torch.randn(2, 3000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head = torch.nn.Linear(256, 32000, bias=False, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 32000, (2, 3000), device="cuda")
    logits = head(h).float()
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32000), labels[:, 1:].reshape(-1))
    (gp,) = torch.autograd.grad(plain, h)
    seg = segmented_lm_loss(h, head, labels, segment=1024)
    (gs,) = torch.autograd.grad(seg, h)
    assert abs(seg.item() - plain.item()) < 1e-3 * plain.item()
    assert _rel(gs, gp) < 1e-2


@pytest.mark.parametrize("backend", ["sdpa-flash", "sdpa-cudnn"])
def test_compact_stream_equals_per_layer_movement_in_bf16(backend):
    """The default config (one shared selection, compact residual stream) under checkpointing, on the
    GPU's attention backends: the same loss and LoRA gradients as gathering and scattering per layer."""
    from tests.helpers import lora_grads, tiny_lora_model

    ids = torch.randint(0, 512, (1, 4096), device="cuda")
    results = []
    for compact in (True, False):
        model = tiny_lora_model("llama2-tiny").to("cuda", torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        apply_lemo(model, LeMoConfig(sparse_first=0, compact_stream=compact, movement_kernel="triton"))
        with attention_context(backend):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results.append((loss.float(), lora_grads(model)))
    (loss, grads), (ref_loss, ref_grads) = results
    assert abs(loss.item() - ref_loss.item()) <= 1e-2 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    # bf16: the two paths round differently (fused Triton norm vs torch norm, in-place vs out-of-place adds)
    got = torch.cat([grads[n].float().flatten() for n in sorted(grads)])
    ref = torch.cat([ref_grads[n].float().flatten() for n in sorted(grads)])
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=0).item()
    assert cosine >= 0.999, (cosine, {n: round(_rel(grads[n], ref_grads[n]), 4) for n in sorted(grads)})
