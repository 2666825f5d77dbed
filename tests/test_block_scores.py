"""Tests for lemo.kernels.block_scores (CPU, fp32; Triton runs in the interpreter)."""

import pytest
import torch

from lemo.kernels.block_scores import block_scores, block_scores_reference, block_scores_torch

RTOL, ATOL = 1e-4, 1e-5


def _qk(B, Hq, Hkv, L, D):
    return torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D)


def _docs(kind, B, L):
    if kind is None:
        return None
    d = torch.zeros(B, L, dtype=torch.int64)
    if kind == "rightpad":  # row b has L - 7*(b+1) real tokens, then -1
        for b in range(B):
            d[b, max(1, L - 7 * (b + 1)) :] = -1
    elif kind == "packed":  # two packed documents, split point not on a block edge
        d[:, L // 2 + 3 :] = 1
        d = d.to(torch.int32)
    elif kind == "leftpad":
        d[:, :5] = -1
    return d


def _hand_loop(q, k, bs, scale, doc_ids):
    B, Hq, L, D = q.shape
    g = Hq // k.shape[1]
    nb = -(-L // bs)
    M = torch.zeros(B, nb, nb)
    for b in range(B):
        for i in range(L):
            for j in range(i + 1):
                if doc_ids is not None and not (doc_ids[b, i] == doc_ids[b, j] and doc_ids[b, i] >= 0):
                    continue
                p = sum(max(0.0, scale * float(q[b, h, i] @ k[b, h // g, j])) for h in range(Hq)) / Hq
                M[b, i // bs, j // bs] = max(M[b, i // bs, j // bs], p)
    return M


@pytest.mark.parametrize("docs", [None, "packed", "rightpad"])
def test_reference_matches_hand_loop(docs):
    B, Hq, Hkv, L, D, bs = 2, 4, 2, 13, 8, 4
    q, k = _qk(B, Hq, Hkv, L, D)
    d = _docs(docs, B, L)
    ref = block_scores_reference(q, k, block_size=bs, scale=0.3, doc_ids=d)
    assert ref.shape == (B, 4, 4) and ref.dtype == torch.float32
    torch.testing.assert_close(ref, _hand_loop(q, k, bs, 0.3, d), rtol=RTOL, atol=ATOL)


# (B, Hq, Hkv, L, D, block_size)
CASES = [
    (2, 4, 2, 150, 32, 64),
    (1, 3, 3, 64, 16, 64),
    (1, 2, 1, 1, 16, 64),
    (1, 2, 2, 65, 16, 64),
    (1, 2, 1, 200, 16, 64),
    (2, 4, 1, 70, 16, 16),
]


def _check(fn, case, docs, **kw):
    B, Hq, Hkv, L, D, bs = case
    q, k = _qk(B, Hq, Hkv, L, D)
    d = _docs(docs, B, L)
    ref = block_scores_reference(q, k, block_size=bs, doc_ids=d)
    bmap, col = fn(q, k, block_size=bs, doc_ids=d, **kw)
    nb = -(-L // bs)
    assert bmap.shape == (B, nb, nb) and bmap.dtype == torch.float32
    assert col.shape == (B, nb) and col.dtype == torch.float32
    torch.testing.assert_close(bmap, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(col, ref.sum(dim=1), rtol=RTOL, atol=ATOL)
    iu = torch.triu_indices(nb, nb, offset=1)
    assert (bmap[:, iu[0], iu[1]] == 0).all()
    _, col2 = fn(q, k, block_size=bs, doc_ids=d, return_map=False, **kw)
    assert _ is None
    torch.testing.assert_close(col2, col, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("docs", [None, "rightpad", "packed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Hq{}_Hkv{}_L{}_D{}_bs{}".format(*c))
def test_triton_matches_reference(case, docs):
    _check(block_scores, case, docs)


@pytest.mark.parametrize("docs", [None, "rightpad", "packed", "leftpad"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Hq{}_Hkv{}_L{}_D{}_bs{}".format(*c))
def test_torch_matches_reference(case, docs):
    L, bs = case[3], case[5]
    # chunk smaller than L, not dividing it (rounded up to whole blocks inside)
    _check(block_scores_torch, case, docs, query_chunk=max(1, min(L - 1, 2 * bs - 5)))


def test_triton_leftpad_noncontiguous_negative_scale():
    B, Hq, Hkv, L, D, bs = 2, 4, 2, 40, 16, 16
    q = torch.randn(B, L, Hq, D).transpose(1, 2)  # (B, Hq, L, D), non-contiguous
    k = torch.randn(B, D, L, Hkv).permute(0, 3, 2, 1)
    d = _docs("leftpad", B, L)
    for scale in (None, -0.2):
        ref = block_scores_reference(q, k, block_size=bs, scale=scale, doc_ids=d)
        bmap, col = block_scores(q, k, block_size=bs, scale=scale, doc_ids=d)
        torch.testing.assert_close(bmap, ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(col, ref.sum(1), rtol=RTOL, atol=ATOL)
        tm, tc = block_scores_torch(q, k, block_size=bs, scale=scale, doc_ids=d, query_chunk=20)
        torch.testing.assert_close(tm, ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(tc, ref.sum(1), rtol=RTOL, atol=ATOL)
    # padded rows/cols contribute nothing
    assert (bmap[:, :, 0] > 0).all()  # block 0 still has real tokens 5..15
    assert (ref[:, 0, 0] >= 0).all()


# (B, Hq, Hkv, L, D, block_size): L a multiple of neither block_size nor R * block_size
R_CASES = [(2, 4, 2, 200, 16, 16), (1, 2, 1, 150, 16, 32), (1, 1, 1, 70, 16, 16)]


LOOPS = [(1, 0, 0), (2, 0, 0), (4, 0, 0), (1, 1, 0), (2, 1, 0), (1, 1, 1), (2, 1, 1)]  # (R, flat, lookahead)


@pytest.mark.parametrize("R,flat,lookahead", LOOPS)
@pytest.mark.parametrize("docs", [None, "rightpad", "packed"])
@pytest.mark.parametrize("case", R_CASES, ids=lambda c: "B{}_Hq{}_Hkv{}_L{}_D{}_bs{}".format(*c))
def test_triton_super_tiles_match_reference(case, docs, R, flat, lookahead):
    """A program covering R x R blocks gives the same map, at the edges and across documents too; so does
    the flat (one loop over query heads, GQA included) head loop, with and without the product of the next
    head issued ahead (one head included)."""
    B, Hq, Hkv, L, D, bs = case
    q, k = _qk(B, Hq, Hkv, L, D)
    d = _docs(docs, B, L)
    ref = block_scores_reference(q, k, block_size=bs, scale=-0.3, doc_ids=d)
    config = {"R": R, "num_warps": 8, "flat": flat, "lookahead": lookahead}
    bmap, col = block_scores(q, k, block_size=bs, scale=-0.3, doc_ids=d, config=config)
    torch.testing.assert_close(bmap, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(col, ref.sum(dim=1), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "config,match",
    [
        ({"R": 3}, r"R.*\(1, 2, 4\)"),
        ({"num_warps": 3}, "num_warps"),
        ({"num_stages": 0}, "num_stages"),
        ({"R": 2.0}, r"config\['R'\]=2.0"),
        ({"BLOCK": 2}, "unknown config keys"),
        ({"lookahead": 1}, "set flat=1"),
        ((1, 4, 3), "must be a dict"),
    ],
)
def test_bad_config(config, match):
    q, k = _qk(1, 2, 1, 20, 16)
    with pytest.raises(ValueError, match=match):
        block_scores(q, k, block_size=16, config=config)


def test_all_padding_is_zero():
    q, k = _qk(1, 2, 1, 20, 16)
    d = torch.full((1, 20), -1)
    bmap, col = block_scores(q, k, block_size=16, doc_ids=d)
    assert (bmap == 0).all() and (col == 0).all()


@pytest.mark.parametrize(
    "qshape,kshape,match",
    [
        ((1, 2, 16, 24), (1, 2, 16, 24), "power of two"),
        ((1, 3, 16, 16), (1, 2, 16, 16), "multiple"),
        ((1, 2, 16, 16), (1, 2, 17, 16), "mismatch"),
        ((2, 2, 16, 16), (1, 2, 16, 16), "mismatch"),
        ((1, 2, 16, 16), (1, 2, 16, 32), "mismatch"),
        ((2, 16, 16), (2, 16, 16), "4-D"),
    ],
)
def test_bad_inputs(qshape, kshape, match):
    q, k = torch.randn(qshape), torch.randn(kshape)
    with pytest.raises(ValueError, match=match):
        block_scores(q, k, block_size=16)
    if match != "power of two":  # the torch paths accept any head_dim
        with pytest.raises(ValueError, match=match):
            block_scores_torch(q, k, block_size=16)
        with pytest.raises(ValueError, match=match):
            block_scores_reference(q, k, block_size=16)


def test_bad_doc_ids_and_block_size():
    q, k = _qk(1, 2, 1, 16, 16)
    with pytest.raises(ValueError, match="doc_ids"):
        block_scores(q, k, block_size=16, doc_ids=torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids"):
        block_scores_torch(q, k, block_size=16, doc_ids=torch.zeros(1, 16))
    with pytest.raises(ValueError, match="block_size"):
        block_scores(q, k, block_size=24)


def test_triton_path_is_used(monkeypatch):
    """Under the interpreter block_scores must run the kernel, not the torch fallback."""
    import lemo.kernels.block_scores as mod

    def _boom(*a, **kw):
        raise AssertionError("fell back to block_scores_torch")

    monkeypatch.setattr(mod, "block_scores_torch", _boom)
    q, k = _qk(1, 2, 1, 20, 16)
    bmap, _ = mod.block_scores(q, k, block_size=16)
    torch.testing.assert_close(bmap, block_scores_reference(q, k, block_size=16), rtol=RTOL, atol=ATOL)
