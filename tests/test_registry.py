import pytest
import torch

from lemo.models.registry import REGISTRY, build_model, get_spec, rope_scale_factor

# Parameter counts of the published checkpoints (embeddings and head included).
PUBLISHED = {
    "llama2-7b": 6.738e9,
    "llama3-8b": 8.030e9,
    "mistral-7b": 7.248e9,
    "qwen2.5-7b": 7.616e9,
    "opt-350m": 0.331e9,
    "opt-1.3b": 1.316e9,
    "opt-2.7b": 2.652e9,
    "opt-6.7b": 6.658e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shapes_give_the_published_parameter_count(name):
    model = build_model(name, device="meta")  # built where asked: no weights touch the CPU
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 1e-3
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())


def test_every_family_has_a_tiny_member():
    families = {spec.model_type for spec in REGISTRY.values()}
    tiny = {spec.model_type for name, spec in REGISTRY.items() if name.endswith("-tiny")}
    assert families == tiny


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="known models: .*llama2-7b"):
        get_spec("llama-7b")


def test_rope_linear_scaling_by_ceil_of_context_ratio():
    spec = get_spec("llama2-7b")
    assert rope_scale_factor(spec, 4096) == 1 and rope_scale_factor(spec, 4097) == 2
    model = build_model("llama2-7b", device="meta", context=65536)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 16.0


def test_opt_context_beyond_learned_positions_fails_with_the_fix():
    with pytest.raises(ValueError, match="cannot take 4096.*context <= 2048"):
        build_model("opt-1.3b", device="meta", context=4096)


def test_local_checkpoint_directory_loads(tmp_path):
    model = build_model("llama2-tiny", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded = build_model("llama2-tiny", checkpoint=str(tmp_path), dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="rope_parameters"):
        build_model("llama2-tiny", checkpoint=str(tmp_path), context=10**6)
