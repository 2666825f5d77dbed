import torch

from lemo.layout import make_layout
from lemo.selection import block_valid, select_blocks, tokens_from_blocks


def test_topk_keeps_ceil_fraction_of_valid_blocks_in_order():
    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0], [0.0, 9.0, 8.0, 7.0, 6.0]])
    valid = torch.ones(2, 5, dtype=torch.bool)
    keep = select_blocks(scores, valid, keep_ratio=0.4)  # ceil(2.0) = 2 blocks
    assert keep.tolist() == [[True, False, True, False, False], [False, True, True, False, False]]


def test_invalid_blocks_are_never_kept_and_count_is_of_valid_ones():
    scores = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    valid = torch.tensor([[True, True, True, False]])
    keep = select_blocks(scores, valid, keep_ratio=0.5)  # ceil(1.5) = 2 of the 3 valid
    assert keep.tolist() == [[False, True, True, False]]


def test_threshold_is_relative_to_layer_mean():
    scores = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3
    keep = select_blocks(scores, torch.ones(1, 4, dtype=torch.bool), threshold=1.0)
    assert keep.tolist() == [[False, False, True, True]]


def test_sink_and_recent_blocks_forced():
    scores = torch.tensor([[0.0, 9.0, 8.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, True, False]])
    keep = select_blocks(scores, valid, keep_ratio=0.25, keep_first=True, keep_last=True)
    assert keep.tolist() == [[True, True, False, True, False]]


def test_tokens_segments_with_padding_and_packing():
    # row 0: two packed documents (positions restart), row 1: right padding
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]])
    layout = make_layout(2, 8, "cpu", mask, pos)
    assert layout.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, -1, -1, -1]]
    valid_blocks = block_valid(layout.valid, 2)
    assert valid_blocks.tolist() == [[True] * 4, [True, True, True, False]]
    kept = torch.tensor([[False, True, True, False], [True, False, True, False]])
    sel = tokens_from_blocks(kept, layout.doc_ids, 2)
    assert sel.index.tolist() == [2, 3, 4, 5, 8, 9, 12]  # padding token 13 dropped
    assert sel.lengths.tolist() == [2, 2, 3]  # (row0, doc0), (row0, doc1), (row1, doc0)
    assert sel.per_row is None


def test_equal_rows_use_the_batched_path():
    layout = make_layout(2, 6, "cpu")
    sel = tokens_from_blocks(torch.tensor([[True, False, True], [False, True, True]]), layout.doc_ids, 2)
    assert sel.per_row == 4 and sel.lengths.tolist() == [4, 4]
