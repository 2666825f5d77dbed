"""Property-based tests (Hypothesis): selection and elimination on random lengths, padding patterns,
keep ratios, block sizes and layer schedules, against direct definitions and the masked dense reference
of tests/test_elimination.py. Derandomized, so CI runs the same examples every time."""

import copy
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lemo import LeMoConfig, apply_lemo, lemo_state
from lemo.layout import make_layout
from lemo.selection import block_valid, select_blocks, tokens_from_blocks
from lemo_baselines.attention import attention_context
from tests.helpers import assert_grads_close, lora_grads, patch_reference_layers, tiny_lora_model
from tests.test_elimination import _reference_layer


@pytest.fixture(scope="module")
def model():
    return tiny_lora_model("llama2-tiny")


FAST = settings(max_examples=150, deadline=None, derandomize=True)
# Model examples cost a second each: no shrinking (minutes), the failing example is reported as drawn.
SLOW = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.generate],
)


@st.composite
def layouts(draw, max_batch=3, max_length=100):
    """(attention_mask, position_ids) with right or left padding and packed documents, every row non-empty."""
    b = draw(st.integers(1, max_batch))
    length = draw(st.integers(2, max_length))
    mask = torch.ones(b, length, dtype=torch.long)
    pos = torch.arange(length).repeat(b, 1)
    for row in range(b):
        pad = draw(st.integers(0, length - 2))
        if draw(st.booleans()):
            mask[row, length - pad :] = 0
        else:
            mask[row, :pad] = 0
        for start in draw(st.lists(st.integers(1, length - 1), max_size=3)):  # a document starts here
            pos[row, start:] -= pos[row, start].clone()
    packed = draw(st.booleans())
    return mask, pos if packed else None


@FAST
@given(layouts(), st.integers(1, 33), st.floats(0.01, 1.0), st.booleans(), st.booleans(), st.integers(0, 2**31))
def test_topk_keeps_the_best_ceil_fraction_of_valid_blocks(layout, block_size, ratio, first, last, seed):
    mask, pos = layout
    lay = make_layout(*mask.shape, "cpu", mask, pos)
    valid = block_valid(lay.valid, block_size)
    scores = torch.randint(0, 5, valid.shape, generator=torch.Generator().manual_seed(seed)).float()  # ties
    keep = select_blocks(scores, valid, keep_ratio=ratio, keep_first=first, keep_last=last)
    assert not (keep & ~valid).any()
    plain = select_blocks(scores, valid, keep_ratio=ratio)
    for row in range(valid.shape[0]):
        n = int(valid[row].sum())
        assert int(plain[row].sum()) == min(n, math.ceil(n * ratio))
        kept, dropped = scores[row][plain[row]], scores[row][valid[row] & ~plain[row]]
        assert dropped.numel() == 0 or kept.min() >= dropped.max()
        idx = valid[row].nonzero().squeeze(1).tolist()
        forced = ({idx[0]} if first else set()) | ({idx[-1]} if last else set())
        assert set((keep[row] & ~plain[row]).nonzero().squeeze(1).tolist()) <= forced  # forcing adds only these
        assert all(keep[row, i] for i in forced)


@FAST
@given(layouts(), st.integers(1, 33), st.floats(0.0, 3.0), st.integers(0, 2**31))
def test_threshold_keeps_exactly_the_blocks_at_or_above_threshold_times_mean(layout, block_size, t, seed):
    mask, pos = layout
    lay = make_layout(*mask.shape, "cpu", mask, pos)
    valid = block_valid(lay.valid, block_size)
    scores = torch.rand(valid.shape, generator=torch.Generator().manual_seed(seed))
    keep = select_blocks(scores, valid, threshold=t)
    for row in range(valid.shape[0]):
        mean = scores[row][valid[row]].mean()
        assert torch.equal(keep[row], valid[row] & (scores[row] >= t * mean))


@FAST
@given(layouts(), st.integers(1, 33), st.integers(0, 2**31))
def test_kept_tokens_are_the_valid_tokens_of_kept_blocks_in_order_split_by_document(layout, block_size, seed):
    mask, pos = layout
    b, length = mask.shape
    lay = make_layout(b, length, "cpu", mask, pos)
    kept = torch.rand(b, math.ceil(length / block_size), generator=torch.Generator().manual_seed(seed)) < 0.5
    sel = tokens_from_blocks(kept, lay.doc_ids, block_size)
    token_kept = kept.repeat_interleave(block_size, 1)[:, :length] & lay.valid
    assert torch.equal(sel.index, token_kept.reshape(-1).nonzero().squeeze(1))  # same set, original order
    assert int(sel.lengths.sum()) == sel.total and bool((sel.lengths > 0).all())
    # Segments are the maximal runs of kept tokens sharing (row, document).
    keys = zip((sel.index // length).tolist(), lay.doc_ids.reshape(-1)[sel.index].tolist())
    assert sel.lengths.tolist() == [len(list(run)) for _, run in itertools.groupby(keys)]
    if sel.per_row is not None:
        assert sel.total == b * sel.per_row


@SLOW
@given(
    layouts(max_batch=2, max_length=90),
    st.sampled_from([8, 16, 32]),
    st.floats(0.1, 1.0),
    st.sets(st.integers(0, 3), min_size=1),
    st.one_of(st.none(), st.floats(0.0, 1.0)),
    st.integers(0, 2**31),
)
def test_sparse_layers_match_the_masked_dense_reference(model, layout, block_size, ratio, schedule, threshold, seed):
    """threshold None: top-k at `ratio`; else threshold selection, at most 1 (the best block of a row is at
    least the mean, so every row keeps one: above 1 a layer may keep no token and its adapters get no gradient)."""
    mask, pos = layout
    b, length = mask.shape
    ids = torch.randint(0, 512, (b, length), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if pos is not None:
        batch["position_ids"] = pos
    lemo_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    cfg = LeMoConfig(
        shared_selection=False,
        loss_tokens="all",
        sparse_first=None,
        keep_ratio=ratio,
        block_size=block_size,
        sparse_layers=sorted(schedule),
        mlp_mode="token",
        segment_loss_tokens=0,
        selection="topk" if threshold is None else "threshold",
        threshold=1.0 if threshold is None else threshold,
    )
    apply_lemo(lemo_model, cfg)
    with attention_context("sdpa-math"):
        loss = lemo_model(**batch).loss
        loss.backward()
    state = lemo_state(lemo_model)
    assert set(state.selections) == schedule
    patch_reference_layers(
        reference, state, lambda layer, parts, keep: _reference_layer(layer, parts, keep, state.layout.doc_ids, "token")
    )
    with attention_context("sdpa-math"):
        ref_loss = reference(**batch).loss
        ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(lora_grads(lemo_model), lora_grads(reference), rtol=1e-4, atol=1e-6)
