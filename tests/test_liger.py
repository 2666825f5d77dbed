"""Liger-Kernel as a baseline (lora-liger) and under LeMo: exact at keep 1.0, and fully undone.

On CPU the kernels run in Triton's interpreter (tests/liger_interpret.py), in fp32."""

import pytest
import torch
from transformers.models.llama import modeling_llama

from lemo import LeMoConfig, apply_lemo, remove_lemo
from lemo.bench.methods import get_method
from lemo.models.registry import build_model
from lemo_baselines.liger import LigerOptions, apply_liger, remove_liger

from .helpers import assert_grads_close, lora_grads, tiny_lora_model
from .liger_interpret import liger_on_this_machine

LENGTH = 64


@pytest.fixture(autouse=True)
def _liger():
    liger_on_this_machine()


def _ids(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, LENGTH), generator=gen)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def _instance_forwards(model):
    return {n for n, m in model.named_modules() if "forward" in m.__dict__}


def test_lora_liger_runs_liger_kernels_and_teardown_restores_everything():
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    base = build_model("llama2-tiny", dtype=torch.float32)
    base.train()
    ids = _ids(base)
    module_before = dict(vars(modeling_llama))
    with torch.no_grad():
        ref = base(input_ids=ids, labels=ids).loss
    method = get_method("lora-liger")
    model = method.setup(base, {"lora": {"adapter_dtype": "model"}})
    norm = model.get_base_model().model.layers[0].input_layernorm
    assert norm.forward.__func__ is LigerRMSNorm.forward
    assert modeling_llama.apply_rotary_pos_emb is not module_before["apply_rotary_pos_emb"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # B starts at zero: LoRA + Liger computes the base model's loss
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)
    assert "Liger-Kernel" in method.describe({})
    restored = method.teardown(model)
    assert restored is base and not _instance_forwards(base)
    assert not any(hasattr(m, "casting_mode") for m in base.modules())
    assert {k: v for k, v in vars(modeling_llama).items()} == module_before
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids, labels=ids).loss, ref)


def _lemo_liger_vs_lora_liger(config: LeMoConfig, expect_liger_norm: bool):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    ref_model = apply_liger(tiny_lora_model("llama2-tiny"))
    ids = _ids(ref_model)
    ref_loss, ref_grads = _step(ref_model, ids)
    remove_liger(ref_model)

    model = apply_lemo(apply_liger(tiny_lora_model("llama2-tiny")), config)
    dense_norm = model.get_base_model().model.layers[0].input_layernorm  # layer 0 is dense in the default schedule
    assert (getattr(dense_norm.forward, "__func__", None) is LigerRMSNorm.forward) == expect_liger_norm
    loss, grads = _step(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    remove_lemo(model)
    assert dense_norm.forward.__func__ is LigerRMSNorm.forward  # LeMo put Liger's forward back
    remove_liger(model)
    assert not _instance_forwards(model)


def test_lemo_over_liger_at_keep_one_equals_lora_liger_with_liger_in_dense_layers():
    # LeMo patches nothing here: Liger's norms, SwiGLU, RoPE (dense layers) and FLCE loss all run.
    _lemo_liger_vs_lora_liger(
        LeMoConfig(keep_ratio=1.0, block_size=16, mlp_mode="dense", efficient_norm=False, segment_loss_tokens=0),
        expect_liger_norm=True,
    )


def test_lemo_over_liger_at_keep_one_equals_lora_liger_with_lemo_kernels_on_top():
    # LeMo's own norm, channel MLP (all channels kept: exact) and segmented Liger loss replace Liger's.
    _lemo_liger_vs_lora_liger(
        LeMoConfig(
            keep_ratio=1.0,
            block_size=16,
            mlp_mode="channel",
            mlp_keep_channels=1.0,
            loss_kernel="liger",
            segment_loss_tokens=32,
        ),
        expect_liger_norm=False,
    )


def test_lemo_method_with_liger_option_sets_up_and_tears_down(tmp_path):
    base = build_model("llama2-tiny", dtype=torch.float32)
    module_before = dict(vars(modeling_llama))
    method = get_method("lemo")
    options = {
        "lora": {"adapter_dtype": "model"},
        "liger": {"swiglu": False},
        "lemo": {"block_size": 16, "keep_ratio": 0.5},
    }
    model = method.setup(base, options)
    lm = model.get_base_model()
    assert "forward" not in lm.model.layers[0].mlp.__dict__  # swiglu: false leaves the HF MLP
    assert "swiglu=False" in method.describe(options)
    method.teardown(model)
    assert not _instance_forwards(base) and dict(vars(modeling_llama)) == module_before
    with pytest.raises(ValueError, match="train-predictors"):  # a refused LeMo config leaves no Liger behind
        method.setup(base, {**options, "lemo": {"scorer": "predictor", "predictor_path": str(tmp_path)}})
    assert not _instance_forwards(base) and dict(vars(modeling_llama)) == module_before
    assert not any("lora_" in n for n, _ in base.named_modules())


def test_liger_refuses_other_families_and_bad_options():
    with pytest.raises(ValueError, match="model types"):
        apply_liger(build_model("qwen2.5-tiny", dtype=torch.float32))
    from lemo.bench.methods import liger_options

    assert liger_options({}) is None and liger_options({"liger": True}) == LigerOptions()
    with pytest.raises(TypeError):
        liger_options({"liger": {"fused": True}})


def test_lora_liger_with_recomputation_and_offload_runs_in_the_harness(tmp_path):
    import json

    from lemo.bench.bench import JobRunner
    from lemo.bench.sweep import jobs

    sweep = {
        "name": "t",
        "device": "cpu",
        "dtype": "float32",
        "warmup": 0,
        "steps": 1,
        "lora": {"adapter_dtype": "model"},
        "methods": {
            "lora-liger": {"method": "lora-liger"},
            "lora-liger-offload": {"method": "lora-liger", "offload_activations": True},
            "lora": {"method": "lora"},
        },
        "groups": [
            {
                "models": ["llama2-tiny"],
                "attention": ["sdpa-math"],
                "gradient_checkpointing": True,
                "contexts": [LENGTH],
                "methods": ["lora-liger", "lora-liger-offload", "lora"],
            }
        ],
    }
    module_before = dict(vars(modeling_llama))
    JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    recs = {p.name.split("__")[1]: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert {m: r["status"] for m, r in recs.items()} == {"lora-liger": "ok", "lora-liger-offload": "ok", "lora": "ok"}
    off = recs["lora-liger-offload"]
    assert "Liger-Kernel" in off["method_description"] and "offloaded to host" in off["method_description"]
    losses = {m: r["metrics"]["loss"] for m, r in recs.items()}  # same model, same batch, B = 0 at the step
    assert losses["lora-liger-offload"] == pytest.approx(losses["lora-liger"], rel=1e-6)
    assert losses["lora"] == pytest.approx(losses["lora-liger"], rel=1e-5)
    assert dict(vars(modeling_llama)) == module_before
