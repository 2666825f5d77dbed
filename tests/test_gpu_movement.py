"""Movement kernels in bf16 on a CUDA GPU (skipped elsewhere): Llama shapes, compiled Triton, whole models."""

import copy

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo.bench.measure import count_saved_bytes
from lemo.kernels import movement as mv
from lemo_baselines.attention import attention_context
from tests.helpers import lora_grads, tiny_lora_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _kept_blocks(n, keep=0.4, block=64, device="cuda"):
    nb = -(-n // block)
    blocks = torch.randperm(nb, device=device)[: max(1, int(keep * nb))].sort().values
    index = (blocks[:, None] * block + torch.arange(block, device=device)).reshape(-1)
    return index[index < n]


@pytest.mark.parametrize("length, d", [(4097, 4096), (1000, 5120), (333, 200)])
def test_load_rms_norm_bf16(length, d):
    base = torch.randn(1, length, d, device="cuda")
    weight = 1 + 0.2 * torch.randn(d, device="cuda")
    index = _kept_blocks(length)
    g = torch.randn(index.numel(), d, device="cuda")
    b64, w64 = base.double().requires_grad_(), weight.double()
    ref = mv.load_rms_norm_reference(b64, index, w64, 1e-5)
    (ref_grad,) = torch.autograd.grad(ref, b64, g.double())
    bb = base.bfloat16().requires_grad_()
    torch_out = mv.load_rms_norm_reference(bb, index, weight.bfloat16(), 1e-5)
    (torch_grad,) = torch.autograd.grad(torch_out, bb, g.bfloat16())
    out = mv.load_rms_norm(bb, index, weight.bfloat16(), 1e-5)
    (grad,) = torch.autograd.grad(out, bb, g.bfloat16())
    assert out.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    assert _rel(out, ref) <= 2 * _rel(torch_out, ref) + 1e-6
    assert _rel(grad, ref_grad) <= 2 * _rel(torch_grad, ref_grad) + 1e-6
    assert grad.float().abs().sum(-1).view(-1).count_nonzero() == index.numel()  # only kept rows


def test_add_rows_and_load_rows_bf16_match_torch():
    base = torch.randn(2, 3001, 4096, device="cuda", dtype=torch.bfloat16)
    index = _kept_blocks(base.shape[0] * base.shape[1])
    rows = torch.randn(index.numel(), 4096, device="cuda", dtype=torch.bfloat16)
    ref = base.view(-1, 4096).index_add(0, index, rows).view(base.shape)
    out = mv.add_rows_(base.clone(), index, rows)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # one rounding per element either way
    torch.testing.assert_close(mv.load_rows(base, index), base.view(-1, 4096)[index], rtol=0, atol=0)


@pytest.mark.parametrize("hq, hkv", [(32, 32), (32, 8)])
def test_rope_rows_bf16(hq, hkv):
    length, hd = 4097, 128
    index = _kept_blocks(length)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
    freqs = torch.outer(torch.arange(length, device="cuda").float(), inv)
    emb = torch.cat([freqs, freqs], -1)[None]
    cos, sin = emb.cos(), emb.sin()
    for h in (hq, hkv):
        x = torch.randn(index.numel(), h, hd, device="cuda")
        ref = mv.rope_rows_reference(x.double(), cos.double(), sin.double(), index, length)
        torch_bf16 = mv.rope_rows_reference(x.bfloat16(), cos.bfloat16(), sin.bfloat16(), index, length)
        out = mv.rope_rows(x.bfloat16(), cos.bfloat16(), sin.bfloat16(), index, length)
        assert _rel(out, ref) <= 2 * _rel(torch_bf16, ref) + 1e-6


@pytest.mark.parametrize("mlp_mode", ["token", "channel"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_triton_movement_bf16_model_matches_torch_movement(mlp_mode, checkpointing):
    fp32 = tiny_lora_model("llama3-tiny").cuda()
    ids = torch.randint(0, 512, (1, 2000), device="cuda")

    def run(model, movement):
        model = copy.deepcopy(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        apply_lemo(
            model, LeMoConfig(keep_ratio=0.4, mlp_mode=mlp_mode, segment_loss_tokens=512, movement_kernel=movement)
        )
        # FlashAttention takes bf16/fp16 only: the fp32 reference runs the math backend
        with attention_context("sdpa-flash" if next(model.parameters()).dtype == torch.bfloat16 else "sdpa-math"):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.float().item(), lora_grads(model), lemo_state(model).selections

    ref_loss, ref_grads, ref_sel = run(fp32, "torch")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    t_loss, t_grads, t_sel = run(bf16, "torch")
    loss, grads, sel = run(bf16, "triton")
    assert abs(loss - t_loss) <= 1e-2 * abs(t_loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[i].index, b[i].index) for i in a)  # noqa: E731
    # bf16 rounding can flip a block ranking: compare gradients only where the same tokens were kept
    if same(sel, t_sel):
        for n in t_grads:
            assert _rel(grads[n], t_grads[n]) <= 5e-2, n
    if same(sel, t_sel) and same(sel, ref_sel):
        for n in ref_grads:
            assert _rel(grads[n], ref_grads[n]) <= 2 * _rel(t_grads[n], ref_grads[n]) + 2e-2, n


def test_triton_movement_saves_no_more_than_torch_on_gpu():
    ids = torch.randint(0, 512, (1, 8192), device="cuda")
    totals = {}
    for movement in ("torch", "triton"):
        torch.manual_seed(0)
        model = tiny_lora_model("llama2-tiny").cuda().to(torch.bfloat16)
        apply_lemo(model, LeMoConfig(keep_ratio=0.4, segment_loss_tokens=1024, movement_kernel=movement))
        with attention_context("sdpa-flash"), count_saved_bytes(model) as saved:
            model(input_ids=ids, labels=ids)
        totals[movement] = saved.total
    assert totals["triton"] < totals["torch"]
