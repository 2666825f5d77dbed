"""LongLoRA against an independent reference: plain attention over explicitly listed segments.

The reference lists each head's segments (groups of g for the first half of the heads; a half group
at each end and full groups in between for the second half, with no wrap-around), loops over them and
runs a causal softmax; it shares no code with baselines/longlora.py.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import AttentionInterface
from transformers.models.llama.modeling_llama import LlamaAttention

from lemo.bench.methods import get_method
from lemo.models.registry import build_model
from lemo_baselines import longlora
from lemo_baselines.lora import apply_lora
from tests.helpers import assert_grads_close, lora_grads

LLAMA_FAMILIES = ["llama2-tiny", "llama3-tiny", "qwen2.5-tiny"]
BACKENDS = ["sdpa", "eager"]


def reference_segments(length, g, shifted):
    """S2-Attn's segments [start, end): groups of g, or (shifted) [0, g//2), [g//2, g//2+g), ..., [L-g+g//2, L)."""
    if not shifted:
        return [(s, s + g) for s in range(0, length, g)]
    cuts = [0, *range(g // 2, length, g), length]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def reference_s2(q, k, v, ratio, scaling):
    """S2-Attn written out: q (B, H, L, D), k/v (B, Hkv, L, D) -> (B, L, H, D)."""
    b, heads, length, d = q.shape
    rep = heads // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # query head i uses kv head i // rep
    g = int(length * ratio)
    out = torch.zeros(b, heads, length, v.shape[-1], dtype=q.dtype)
    for head in range(heads):
        for start, end in reference_segments(length, g, shifted=head >= heads // 2):
            sl = slice(start, end)
            causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            scores = (q[:, head, sl] @ k[:, head, sl].transpose(-1, -2)) * scaling
            out[:, head, sl] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, head, sl]
    return out.transpose(1, 2)


def test_reference_segments():
    assert reference_segments(32, 8, False) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert reference_segments(32, 8, True) == [(0, 4), (4, 12), (12, 20), (20, 28), (28, 32)]
    assert reference_segments(27, 9, True) == [(0, 4), (4, 13), (13, 22), (22, 27)]
    assert reference_segments(8, 8, True) == [(0, 4), (4, 8)]
    assert reference_segments(4, 1, True) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    assert module.training
    return reference_s2(query, key, value, 0.25, scaling), None


AttentionInterface.register("test_reference_s2", _reference_attention)


def _attention_module(heads, kv_heads, head_dim=16):
    cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads)
    return LlamaAttention(cfg, layer_idx=0).train()


# ---- attention-function level ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 4), (8, 2), (6, 2)])
@pytest.mark.parametrize("length,ratio", [(64, 0.25), (40, 0.25), (36, 0.25), (12, 0.25), (4, 0.25), (16, 1.0)])
def test_s2_function_matches_reference(backend, heads, kv_heads, length, ratio):
    """Groups of 16, 10 (even), 9, 3 (odd: unequal end segments), 1 (empty first end) and L (no middle groups)."""
    module = _attention_module(heads, kv_heads)
    q = torch.randn(2, heads, length, 16, requires_grad=True)
    k = torch.randn(2, kv_heads, length, 16, requires_grad=True)
    v = torch.randn(2, kv_heads, length, 16, requires_grad=True)
    fn = longlora.make_s2_attention(backend, ratio)
    out, _ = fn(module, q, k, v, None, scaling=module.scaling, dropout=0.0)
    ref = reference_s2(q, k, v, ratio, module.scaling)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)  # g = 1: q grads are 0 up to rounding


@pytest.mark.parametrize(
    "token,unshifted,shifted",
    [(9, (9, 16), (9, 12)), (2, (2, 8), (2, 4)), (29, (29, 32), (29, 32)), (26, (26, 32), (26, 28))],
)
def test_s2_is_local_to_its_segments(token, unshifted, shifted):
    """A token's K/V reach only later tokens of its group (unshifted heads) / shifted segment (others)."""
    module = _attention_module(4, 2)
    fn = longlora.make_s2_attention("sdpa", 0.25)  # L=32: groups 0..7, 8..15, ...; shifted 0..3, 4..11, ..., 28..31
    q, k, v = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    base, _ = fn(module, q, k, v, None, scaling=0.25)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, token], v2[:, :, token] = 5.0, 5.0
    out, _ = fn(module, q, k2, v2, None, scaling=0.25)
    changed = (out - base).abs().amax(-1)[0] > 0  # (L, H)
    rows = torch.arange(32)
    assert torch.equal(changed[:, :2].any(1), (rows >= unshifted[0]) & (rows < unshifted[1]))  # kv head 0
    assert torch.equal(changed[:, 2:].any(1), (rows >= shifted[0]) & (rows < shifted[1]))  # kv head 1


# ---- causality: no position sees a later token ------------------------------------------------


def _assert_causal(outputs, base):
    """outputs[j]: the output (B, L, ...) with token j perturbed; positions < j must be unchanged."""
    for j, out in outputs.items():
        diff = (out - base).abs().flatten(2).amax(-1).amax(0)  # (L,)
        if j:
            leak = int(diff[:j].argmax())
            assert diff[leak] <= 1e-6, f"position {leak} sees later token {j} (output changed by {diff[leak]:.3g})"
        assert diff[j] > 1e-4, j  # the perturbation is seen: the check is not vacuous


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("length,ratio", [(32, 0.25), (36, 0.25), (16, 1.0)])
def test_s2_function_is_causal(backend, heads, kv_heads, length, ratio):
    """Perturbing q/k/v of token j changes no output at a position i < j, in any head."""
    module = _attention_module(heads, kv_heads)
    fn = longlora.make_s2_attention(backend, ratio)
    q = torch.randn(2, heads, length, 16)
    k, v = torch.randn(2, kv_heads, length, 16), torch.randn(2, kv_heads, length, 16)
    base, _ = fn(module, q, k, v, None, scaling=module.scaling, dropout=0.0)
    outputs = {}
    for j in range(length):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, j] += 3.0
        outputs[j] = fn(module, q2, k2, v2, None, scaling=module.scaling, dropout=0.0)[0]
    _assert_causal(outputs, base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["llama2-tiny", "llama3-tiny"])  # MHA, GQA
def test_model_train_mode_is_causal(name, backend):
    """Whole model in train mode: changing input token j changes no logit at a position i < j."""
    model, _ = _pair(name, backend)
    length = 32
    ids = torch.randint(0, 512, (2, length))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        outputs = {}
        for j in range(length):
            ids2 = ids.clone()
            ids2[:, j] = (ids2[:, j] + 1 + j) % 512
            outputs[j] = model(input_ids=ids2).logits
    _assert_causal(outputs, base)


def test_s2_function_in_eval_mode_is_the_inner_implementation():
    module = _attention_module(4, 2).eval()
    q, k, v = torch.randn(1, 4, 30, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    out, _ = longlora.make_s2_attention("sdpa")(module, q, k, v, None, scaling=0.25)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.25
    ).transpose(1, 2)
    torch.testing.assert_close(out, dense)  # 30 tokens: no whole groups, and no error in eval


# ---- whole model ------------------------------------------------------------------------------


def _pair(name, backend, seed=0):
    """(LongLoRA model, reference model): same weights and LoRA adapters, trainables set independently."""
    base = build_model(name, dtype=torch.float32, attn_implementation=backend, seed=seed)
    reference = apply_lora(copy.deepcopy(base))
    model = longlora.setup(base, {})
    for m in (model, reference):
        gen = torch.Generator().manual_seed(seed + 1)
        for n, p in m.named_parameters():
            if "lora_" in n:  # the same adapters in both (PEFT starts B at zero: make them matter)
                p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    for n, p in reference.named_parameters():
        if "embed_tokens" in n or "norm" in n:
            p.requires_grad_(True)
    reference.set_attn_implementation("test_reference_s2")
    return model.train(), reference.train()


def _loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), lora_grads(model)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LLAMA_FAMILIES)
def test_model_train_forward_and_grads_match_reference(name, backend):
    model, reference = _pair(name, backend)
    ids = torch.randint(0, 512, (2, 64))
    logits, loss, grads = _loss_and_grads(model, input_ids=ids, labels=ids)
    ref_logits, ref_loss, ref_grads = _loss_and_grads(reference, input_ids=ids, labels=ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)  # also: the same parameters train
    # and S2-Attn is not dense attention
    dense = copy.deepcopy(model)
    longlora.remove_s2_attn(dense)
    assert (dense(input_ids=ids).logits - logits).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LLAMA_FAMILIES)
def test_eval_mode_equals_untouched_model(name, backend):
    model = build_model(name, dtype=torch.float32, attn_implementation=backend)
    ids = torch.randint(0, 512, (2, 50))  # any length in eval, padding too
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, 37:] = 0
    model.eval()
    with torch.no_grad():
        ref = [model(input_ids=ids).logits, model(input_ids=ids, attention_mask=mask).logits]
        model = longlora.setup(model, {}).eval()
        assert model.config._attn_implementation.startswith("longlora_s2")
        assert torch.equal(model(input_ids=ids).logits, ref[0])
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref[1])


def test_gradient_checkpointing_gives_the_same_step():
    model, _ = _pair("llama3-tiny", "sdpa")
    ids = torch.randint(0, 512, (1, 64))
    _, loss, grads = _loss_and_grads(model, input_ids=ids, labels=ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, loss_ckpt, grads_ckpt = _loss_and_grads(model, input_ids=ids, labels=ids)
    torch.testing.assert_close(loss_ckpt, loss)
    assert_grads_close(grads_ckpt, grads)


@pytest.mark.parametrize("name", LLAMA_FAMILIES)
def test_gradients_reach_lora_embeddings_and_norms_only(name):
    model, _ = _pair(name, "sdpa")
    ids = torch.randint(0, 512, (2, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = model.config.num_hidden_layers
    norms = {n for n in trainable if "norm" in n}
    assert len(norms) == 2 * layers + 1  # input + post-attention norm per layer, and the final norm
    assert sum("embed_tokens" in n for n in trainable) == 1
    assert sum("lora_" in n for n in trainable) == 2 * 4 * layers  # A and B on q, k, v, o
    assert len(trainable) == len(norms) + 1 + 2 * 4 * layers  # nothing else: no lm_head, MLP, base proj
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            if "lora_A" not in n:  # A's gradient is B^T(...), and B is random: all nonzero
                assert p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("backend", BACKENDS)
def test_teardown_restores_attention_and_requires_grad(backend):
    ids = torch.randint(0, 512, (1, 64))
    flags, models = {}, {}
    for method in ("lora", "longlora"):
        base = build_model("llama3-tiny", dtype=torch.float32, attn_implementation=backend)
        m = get_method(method).setup(base, {})
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        models[method] = get_method(method).teardown(m)
        flags[method] = {n: p.requires_grad for n, p in models[method].named_parameters()}
    assert flags["longlora"] == flags["lora"]
    restored = models["longlora"]
    assert type(restored) is LlamaForCausalLM
    assert restored.config._attn_implementation == backend
    assert not longlora.s2_attn_active(restored)
    assert set(restored.state_dict()) == set(models["lora"].state_dict())
    restored.train()  # dense again in train mode, any length
    restored(input_ids=torch.randint(0, 512, (1, 37)))


# ---- bad input --------------------------------------------------------------------------------


def test_odd_kv_heads_rejected_before_lora():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=3,
    )
    model = LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="even num_key_value_heads"):
        longlora.setup(model, {})
    assert not hasattr(model, "peft_config") and not longlora.s2_attn_active(model)
    module = _attention_module(6, 3)
    q, kv = torch.randn(1, 6, 32, 16), torch.randn(1, 3, 32, 16)
    with pytest.raises(ValueError, match="even num_key_value_heads"):
        longlora.make_s2_attention("sdpa")(module, q, kv, kv, None, scaling=0.25)


def test_non_llama_family_rejected():
    with pytest.raises(ValueError, match="'lora' method"):
        longlora.setup(build_model("opt-tiny", dtype=torch.float32), {})


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_and_packing_rejected_in_training(backend):
    model, _ = _pair("llama2-tiny", backend)
    ids = torch.randint(0, 512, (2, 64))
    mask = torch.ones(2, 64, dtype=torch.long)
    model(input_ids=ids, attention_mask=mask)  # all ones: fine
    mask[1, 50:] = 0
    with pytest.raises(ValueError, match="unpadded.*attention_mask=None"):
        model(input_ids=ids, attention_mask=mask)
    packed = torch.cat([torch.arange(24), torch.arange(40)])[None].expand(2, -1)
    with pytest.raises(ValueError, match="unpadded"):
        model(input_ids=ids, position_ids=packed)


def test_all_ones_mask_equals_no_mask():
    model, _ = _pair("llama3-tiny", "eager")
    ids = torch.randint(0, 512, (2, 64))
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, model(input_ids=ids).logits
    )


def test_indivisible_length_names_the_fix():
    model, _ = _pair("llama2-tiny", "sdpa")
    with pytest.raises(ValueError, match=r"multiple of 4.*152"):
        model(input_ids=torch.randint(0, 512, (1, 150)))
    with pytest.raises(ValueError, match="group_ratio"):
        longlora.group_size(3, 0.25)  # groups of 0 tokens


def test_bad_options_rejected():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        longlora.LongLoraOptions(group_ratio=0)
    with pytest.raises(ValueError, match="choose from"):
        longlora.LongLoraOptions(trainable=["embed", "lm_head"])
    assert longlora.LongLoraOptions(trainable="embed,norm").trainable == ("embed", "norm")


# ---- through the methods table ----------------------------------------------------------------


def test_longlora_method_setup_and_teardown():
    method = get_method("longlora")
    options = {"lora": {"r": 4, "alpha": 8}, "longlora": {"group_ratio": 0.5, "trainable": ["norm"]}}
    assert "LongLoRA" in method.describe(options) and "0.5" in method.describe(options)
    base = build_model("qwen2.5-tiny", dtype=torch.float32)
    model = method.setup(base, options)
    assert model.config._attn_implementation == "longlora_s2_sdpa_r0.5"
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" in n)
    model.train()
    ids = torch.randint(0, 512, (2, 48))  # groups of 24
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "norm" in n)
    restored = method.teardown(model)
    assert restored is base and restored.config._attn_implementation == "sdpa"
    assert not any(p.requires_grad for p in restored.parameters())  # as LoRA's teardown leaves them
