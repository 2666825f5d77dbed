import pytest
import torch
import torch.nn.functional as F

from lemo.bench.measure import count_saved_bytes
from lemo.segment_loss import segmented_lm_loss


def _plain(hidden, head, labels):
    logits = head(hidden).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("segment", [1, 7, 64, 1000])
@pytest.mark.parametrize("train_head", [False, True])
def test_equals_plain_loss_and_gradients(segment, train_head, kernel):
    head = torch.nn.Linear(32, 101, bias=True)
    head.requires_grad_(train_head)
    hidden = torch.randn(2, 45, 32, requires_grad=True)
    labels = torch.randint(0, 101, (2, 45))
    labels[0, 10:20] = -100
    wrt = [hidden] + ([head.weight, head.bias] if train_head else [])
    ref = _plain(hidden, head, labels)
    ref_grads = torch.autograd.grad(ref, wrt)
    loss = segmented_lm_loss(hidden, head, labels, segment, kernel=kernel)
    grads = torch.autograd.grad(loss, wrt)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_never_keeps_full_length_logits():
    head = torch.nn.Linear(16, 500, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 300, 16, requires_grad=True)
    labels = torch.randint(0, 500, (1, 300))
    with count_saved_bytes(head) as saved:
        segmented_lm_loss(hidden, head, labels, segment=64)
    assert saved.total < 300 * 500 * 4 / 4  # only hidden (and targets) saved, no logits
    with count_saved_bytes(head) as plain:
        _plain(hidden, head, labels)
    assert plain.total >= 300 * 500 * 4


def test_bad_labels_fail_clearly():
    head = torch.nn.Linear(8, 10)
    with pytest.raises(ValueError, match="labels shape"):
        segmented_lm_loss(torch.randn(1, 5, 8), head, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="segment"):
        segmented_lm_loss(torch.randn(1, 5, 8), head, torch.zeros(1, 5, dtype=torch.long), 0)
