"""lemo.crossover: min_sparse_tokens chosen from timed sparse and dense steps, and its sweep option."""

import pytest
import torch

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo import crossover as cx
from lemo.bench.sweep import method_options
from tests.helpers import tiny_lora_model

LENGTHS = [64, 128, 256, 512]


def _model():
    model = tiny_lora_model("llama2-tiny")
    return apply_lemo(model, LeMoConfig(sparse_first=0, block_size=16, min_sparse_tokens=7))


def test_calibration_times_sparse_and_dense_steps_and_leaves_the_config_as_found():
    model = _model()
    kept = {}  # length -> tokens kept by the last forward of each mode

    def timed(model, ids, warmup, steps):
        kept[ids.shape[1], cx.lemo_config(model).min_sparse_tokens > 0] = bool(lemo_state(model).selections)
        return 1.0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cx, "_median_step", lambda m, ids, w, s: (m(input_ids=ids, labels=ids), timed(m, ids, w, s))[1])
        cal = cx.calibrate_min_sparse_tokens(model, LENGTHS, steps=1)
    assert cx.lemo_config(model).min_sparse_tokens == 7 and model.training
    assert set(cal.seconds) == set(LENGTHS) and all(set(v) == {"sparse", "dense"} for v in cal.seconds.values())
    # sparse steps select tokens; dense ones (min_sparse_tokens above the length) run no LeMo layer
    assert all(kept[n, False] for n in LENGTHS) and not any(kept[n, True] for n in LENGTHS)
    assert cal.min_sparse_tokens == LENGTHS[0]  # equal times: sparse is no slower anywhere


@pytest.mark.parametrize(
    "sparse,expected",
    [
        ([0.5, 0.5, 0.5, 0.5], 64),  # faster everywhere
        ([2.0, 0.5, 0.5, 0.5], 128),
        ([0.5, 2.0, 0.5, 0.5], 256),  # a slower length in between: dense up to it
        ([2.0, 2.0, 2.0, 0.5], 512),
    ],
)
def test_the_choice_is_the_shortest_length_from_which_sparse_is_never_slower(sparse, expected):
    times = {(n, "sparse"): t for n, t in zip(LENGTHS, sparse)} | {(n, "dense"): 1.0 for n in LENGTHS}

    def timed(model, ids, warmup, steps):
        mode = "dense" if cx.lemo_config(model).min_sparse_tokens > ids.shape[1] else "sparse"
        return times[ids.shape[1], mode]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cx, "_median_step", timed)
        assert cx.calibrate_min_sparse_tokens(_model(), LENGTHS).min_sparse_tokens == expected


def test_sparse_slower_at_the_longest_length_runs_everything_measured_dense_and_says_so():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cx, "_median_step", lambda m, ids, w, s: 2.0 if cx.lemo_config(m).min_sparse_tokens == 0 else 1.0)
        with pytest.warns(UserWarning, match="longer lengths"):
            assert cx.calibrate_min_sparse_tokens(_model(), LENGTHS).min_sparse_tokens == 513


def test_a_real_calibration_runs_and_drops_its_gradients():
    model = _model()
    cal = cx.calibrate_min_sparse_tokens(model, [32, 64], warmup=0, steps=1)
    assert set(cal.seconds) == {32, 64} and all(0 < t < 60 for v in cal.seconds.values() for t in v.values())
    assert all(p.grad is None for p in model.parameters())


def test_a_step_out_of_memory_counts_as_infinitely_slow(monkeypatch):
    def timed(model, ids, warmup, steps):
        if cx.lemo_config(model).min_sparse_tokens > ids.shape[1] and ids.shape[1] >= 256:
            raise torch.OutOfMemoryError("CUDA out of memory")  # dense does not fit from 256 on
        return 1.0 if cx.lemo_config(model).min_sparse_tokens else 2.0

    monkeypatch.setattr(cx, "_median_step", timed)
    cal = cx.calibrate_min_sparse_tokens(_model(), LENGTHS)
    assert cal.min_sparse_tokens == 256 and cal.seconds[256]["dense"] == float("inf")


def test_sequence_parallel_lemo_has_nothing_to_calibrate():
    model = _model()
    model.base_model.model._lemo.state.always_sparse = True
    with pytest.raises(ValueError, match="sequence-parallel"):
        cx.calibrate_min_sparse_tokens(model, LENGTHS)


@pytest.mark.parametrize("bad", [[], [0, 64]])
def test_bad_lengths_are_refused(bad):
    with pytest.raises(ValueError, match="positive token counts"):
        cx.calibrate_min_sparse_tokens(_model(), bad)


def test_without_lemo_it_says_to_apply_it():
    with pytest.raises(ValueError, match="apply_lemo"):
        cx.calibrate_min_sparse_tokens(tiny_lora_model("llama2-tiny"), [64])


@pytest.mark.parametrize("bad", [4096, [2048, "4096"], [0]])
def test_the_sweep_option_takes_a_list_of_token_counts(bad):
    with pytest.raises(ValueError, match="calibrate must be a list"):
        method_options({"method": "lemo", "calibrate": bad}, "methods.x")
    with pytest.raises(ValueError, match="takes no"):
        method_options({"method": "lora", "calibrate": [2048]}, "methods.x")
    method_options({"method": "lemo", "calibrate": [2048, 4096]}, "methods.x")


def test_the_sweep_option_sets_min_sparse_tokens_once_per_model_and_mode(monkeypatch):
    from lemo.bench import methods

    calls = []

    def fake(model, lengths, batch_size):
        calls.append(lengths)
        return cx.Calibration(128 * len(calls), {64: {"sparse": 2.0, "dense": 1.0}})

    monkeypatch.setattr(methods, "calibrate_min_sparse_tokens", fake)
    base = tiny_lora_model("llama2-tiny").unload()
    options = {"lemo": {"block_size": 16}, "calibrate": [64, 128]}
    for checkpointing, expected in ((False, 128), (False, 128), (True, 256)):
        model = methods.get_method("lemo").setup(base, options)
        cal = methods.calibrate(model, options, (checkpointing, "sdpa-math", 1))
        assert cx.lemo_config(model).min_sparse_tokens == cal.min_sparse_tokens == expected
        methods.get_method("lemo").teardown(model)
    assert calls == [[64, 128], [64, 128]]
    assert methods.calibrate(base, {"lemo": {}}, (False,)) is None
