"""Defects found by using the API as a new user would (issue 13); each test failed before its fix."""

import copy
import json

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo.models.registry import build_model
from lemo.predictors import PredictorSet, build_predictors, load_scorer
from lemo.segment_loss import segmented_lm_loss
from tests.helpers import assert_grads_close, lora_grads, tiny_lora_model

CFG = dict(keep_ratio=0.5, block_size=16)


def test_training_forward_accepts_use_cache_false_with_labels():
    model = tiny_lora_model("llama2-tiny")
    apply_lemo(model, LeMoConfig(**CFG))
    ids = torch.randint(0, 512, (1, 64))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    assert torch.isfinite(out.loss) and lemo_state(model).selections


@pytest.mark.parametrize("labels", [False, True])
def test_config_default_use_cache_true_works_in_training(labels):
    model = tiny_lora_model("llama2-tiny")
    model.config.use_cache = True
    apply_lemo(model, LeMoConfig(**CFG))
    ids = torch.randint(0, 512, (1, 64))
    out = model(input_ids=ids, labels=ids if labels else None)
    assert lemo_state(model).selections  # the sparse layers ran, with no cache built for them
    assert out.past_key_values is None
    (out.loss if labels else out.logits.sum()).backward()


def test_a_cache_the_caller_passes_still_fails_clearly():
    from transformers import DynamicCache

    model = tiny_lora_model("llama2-tiny")
    apply_lemo(model, LeMoConfig(**CFG))
    ids = torch.randint(0, 512, (1, 64))
    with pytest.raises(ValueError, match="do not fill a KV cache"):
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config))


def test_channel_mode_gradients_in_eval_equal_the_untouched_model():
    model = tiny_lora_model("llama2-tiny")
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 512, (1, 96))
    grads = {}
    for name, m in (("ref", reference), ("lemo", model)):
        if name == "lemo":
            apply_lemo(m, LeMoConfig(mlp_mode="channel", **CFG))
        m.eval()
        m(input_ids=ids, labels=ids).loss.backward()
        grads[name] = lora_grads(m)
    assert_grads_close(grads["lemo"], grads["ref"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("length", [1, 9])
def test_nothing_labelled_gives_nan_loss_and_zero_gradients_like_hf(kernel, length):
    head = torch.nn.Linear(16, 31)
    hidden = torch.randn(2, length, 16, requires_grad=True)
    labels = torch.randint(0, 31, (2, length)) if length == 1 else torch.full((2, length), -100)
    loss = segmented_lm_loss(hidden, head, labels, 4, kernel=kernel)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_model_loss_with_all_labels_ignored_is_nan_like_hf():
    model = tiny_lora_model("llama2-tiny")
    ids = torch.randint(0, 512, (1, 64))
    labels = torch.full_like(ids, -100)
    assert torch.isnan(model(input_ids=ids, labels=labels).loss)  # Hugging Face
    apply_lemo(model, LeMoConfig(**CFG))
    assert torch.isnan(model(input_ids=ids, labels=labels).loss)


@pytest.fixture(scope="module")
def saved_predictors(tmp_path_factory):
    model = build_model("llama2-tiny", dtype=torch.float32)
    path = build_predictors(model, block_size=16, widths=(8, 8)).save(tmp_path_factory.mktemp("p") / "p")
    return model, path


def _broken_copy(src, dst, meta=None, weights=None):
    dst.mkdir()
    (dst / "predictors.json").write_text(
        meta(json.loads((src / "predictors.json").read_text())) if meta else (src / "predictors.json").read_text()
    )
    data = (src / "predictors.safetensors").read_bytes()
    (dst / "predictors.safetensors").write_bytes(weights(data) if weights else data)
    return dst


@pytest.mark.parametrize(
    "meta, weights, words",
    [
        (lambda m: "{not json", None, r"predictors.json: not valid JSON"),
        (None, lambda b: b[: len(b) // 2], r"predictors.safetensors: cannot load"),
        (
            lambda m: json.dumps({k: v for k, v in m.items() if k != "identity"}),
            None,
            r"predictors.json: missing keys \['identity'\]",
        ),
        (
            lambda m: json.dumps({**m, "identity": {}}),
            None,
            r"predictors.json: missing keys \['identity.fingerprint'\]",
        ),
        (lambda m: json.dumps([1]), None, r"predictors.json: format 'list'"),
    ],
)
def test_broken_predictor_files_fail_naming_the_file(saved_predictors, tmp_path, meta, weights, words):
    model, src = saved_predictors
    path = _broken_copy(src, tmp_path / "broken", meta, weights)
    with pytest.raises(ValueError, match=words) as err:
        load_scorer(path, model)
    assert str(path) in str(err.value)
    assert PredictorSet.load(src).layers  # the intact copy still loads
