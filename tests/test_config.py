import pytest

from lemo import LeMoConfig


def test_paper_schedule_matches_the_artifact_and_the_default_starts_at_layer_2():
    # the artifact on Llama-2-7B: layers 15-30 sparse, 0-14 and 31 dense
    assert LeMoConfig.paper().resolve_sparse_layers(32) == list(range(15, 31))
    assert LeMoConfig.paper().resolve_sparse_layers(4) == [1, 2]
    # the default (the SmolLM2 winner): every layer but the first two and the last
    assert LeMoConfig().resolve_sparse_layers(32) == list(range(2, 31))
    assert LeMoConfig().resolve_sparse_layers(4) == [2]


def test_json_round_trip_keeps_every_field():
    cfg = LeMoConfig(
        keep_ratio=0.25,
        selection="threshold",
        threshold={3: 1.5, 5: 0.8},
        sparse_layers=[5, 3],
        mlp_mode="channel",
        keep_first_block=True,
        segment_loss_tokens=0,
    )
    back = LeMoConfig.from_json(cfg.to_json())
    assert back == cfg
    assert back.threshold == {3: 1.5, 5: 0.8} and back.sparse_layers == [3, 5]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(keep_ratio=0.0), "keep_ratio"),
        (dict(keep_ratio=1.5), "keep_ratio"),
        (dict(mlp_mode="both"), "mlp_mode"),
        (dict(selection="random"), "selection"),
        (dict(mlp_keep_channels=0), "mlp_keep_channels"),
        (dict(kernels="cuda"), "kernels"),
        (dict(segment_loss_tokens=-1), "segment_loss_tokens"),
        (dict(min_sparse_tokens=-1), "min_sparse_tokens"),
        (dict(min_sparse_tokens=8.5), "min_sparse_tokens"),
    ],
)
def test_bad_values_fail_naming_the_field(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LeMoConfig(**kwargs)


def test_unknown_layer_index_fails():
    with pytest.raises(ValueError, match=r"sparse_layers \[7\] out of range"):
        LeMoConfig(sparse_layers=[1, 7]).resolve_sparse_layers(4)


def test_unknown_field_fails():
    with pytest.raises(ValueError, match=r"LeMoConfig: unknown fields \['keep'\]"):
        LeMoConfig.from_dict({"keep": 0.4})


def test_threshold_dict_must_cover_sparse_layers():
    cfg = LeMoConfig(selection="threshold", threshold={1: 1.0})
    assert cfg.layer_threshold(1) == 1.0
    with pytest.raises(ValueError, match="no threshold for sparse layer 2"):
        cfg.layer_threshold(2)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(active_in_eval="false"), r"active_in_eval must be true or false, got 'false' \(str\)"),
        (dict(keep_first_block=1), "keep_first_block must be true or false"),
        (dict(sparse_layers="12"), "sparse_layers must be a list of layer indices"),
        (dict(sparse_layers=[1.7]), r"sparse_layers must hold integers >= 0, got \[1.7\]"),
        (dict(sparse_layers=[True]), "sparse_layers must hold integers"),
        (dict(sparse_layers=[-1]), "sparse_layers must hold integers >= 0"),
        (dict(keep_ratio="0.4"), r"keep_ratio must be a number, got '0.4' \(str\)"),
        (dict(keep_ratio=float("nan")), "keep_ratio must be in"),
        (dict(block_size=None), r"block_size must be an integer, got None"),
        (dict(block_size=16.5), "block_size must be an integer"),
        (dict(segment_loss_tokens=1024.0), "segment_loss_tokens must be an integer"),
        (dict(threshold=float("nan")), "threshold must be a finite number >= 0"),
        (dict(threshold=-0.5), "threshold must be a finite number >= 0"),
        (dict(threshold={3: float("inf")}), r"threshold\[3\] must be a finite number"),
        (dict(threshold={"x": 1.0}), "threshold keys must be layer indices"),
        (dict(mlp_mode=None), "mlp_mode must be a string"),
        (dict(predictor_path=3), "predictor_path must be a string or null"),
    ],
)
def test_wrong_types_fail_naming_field_value_and_what_is_allowed(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LeMoConfig(**kwargs)


def test_json_threshold_keys_and_integral_numbers_are_accepted():
    cfg = LeMoConfig.from_dict({"threshold": {"3": 1, "5": 0.5}, "keep_ratio": 1, "sparse_layers": (3, 5)})
    assert cfg.threshold == {3: 1.0, 5: 0.5} and cfg.sparse_layers == [3, 5]
    assert LeMoConfig(threshold=0).threshold == 0.0


def test_one_layer_model_with_default_schedule_warns_naming_the_fix():
    with pytest.warns(UserWarning, match=r"no sparse layer .* sparse_layers=\[0\]"):
        assert LeMoConfig().resolve_sparse_layers(1) == []
    assert LeMoConfig(sparse_layers=[0]).resolve_sparse_layers(1) == [0]
