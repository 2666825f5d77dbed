"""LeMo over Liger-Kernel in bf16 on a CUDA GPU (skipped elsewhere; CPU fp32 versions in test_liger.py)."""

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, remove_lemo
from lemo.models.registry import build_model
from lemo_baselines.attention import attention_context
from lemo_baselines.liger import apply_liger, remove_liger
from lemo_baselines.lora import LoraOptions, apply_lora

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(
    "config",
    [
        dict(
            mlp_mode="channel",
            mlp_keep_channels=1.0,
            movement_kernel="triton",
            loss_kernel="liger",
            segment_loss_tokens=256,
        ),
        dict(
            mlp_mode="channel",
            mlp_keep_channels=1.0,
            mlp_channel_all_layers=False,
            efficient_norm=False,
            loss_kernel="liger",
            segment_loss_tokens=256,
        ),
    ],
)
def test_lemo_over_liger_keep_one_matches_lora_liger_in_bf16(config):
    pytest.importorskip("liger_kernel")
    model = apply_lora(
        build_model("llama3-tiny", device="cuda", dtype=torch.bfloat16), LoraOptions(adapter_dtype="model")
    )
    model.train()
    ids = torch.randint(0, 512, (1, 1000), device="cuda")
    with attention_context("sdpa-flash"):
        apply_liger(model)
        ref = model(input_ids=ids, labels=ids).loss.float()
        apply_lemo(model, LeMoConfig(keep_ratio=1.0, **config))
        got = model(input_ids=ids, labels=ids).loss.float()
        got.backward()
    assert abs(got.item() - ref.item()) <= 1e-2 * abs(ref.item())
    remove_liger(remove_lemo(model))
    assert not any("forward" in m.__dict__ for m in model.modules())
