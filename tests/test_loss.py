"""The LM head's loss for training: each row's cross-entropy and its gradient by hand, and the
chunked linear cross-entropy against plain autograd."""

import pytest
import torch
import torch.nn.functional as F

from llm.loss import IGNORE_INDEX, LinearCrossEntropy, cross_entropy_rows


def test_rows_gradient_is_autograds_and_padded_columns_take_none():
    # 100 real columns padded to 128: the padding is out of the softmax and gets no gradient.
    torch.manual_seed(0)
    logits = torch.randn(6, 128) * 3
    targets = torch.tensor([99, 0, IGNORE_INDEX, 5, 42, 7])
    inv_count = 1 / (targets != IGNORE_INDEX).sum()
    losses, grad = cross_entropy_rows(logits, targets, 100, inv_count, with_grad=True)
    real = logits[:, :100].clone().requires_grad_()
    expected = F.cross_entropy(real, targets, ignore_index=IGNORE_INDEX, reduction="none")
    expected.mean(0).backward()  # mean over all rows; rescaled to the counted ones below
    assert torch.allclose(losses, expected.detach(), atol=1e-6)
    assert losses[2] == 0
    assert torch.allclose(grad[:, :100], real.grad * 6 * inv_count, atol=1e-7)
    assert (grad[:, 100:] == 0).all() and (grad[2] == 0).all()
    alone, no_grad = cross_entropy_rows(logits, targets, 100, inv_count, with_grad=False)
    assert no_grad is None and torch.allclose(alone, losses, atol=1e-6)


@pytest.mark.parametrize("max_rows_per_chunk", [10, 4])  # one chunk; 4, 4 and 2 rows
def test_linear_cross_entropy_equals_autograd_through_the_logits(max_rows_per_chunk):
    torch.manual_seed(0)
    x = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(64, 16, requires_grad=True)  # 50 real rows padded to 64
    targets = torch.randint(0, 50, (10,))
    targets[3] = IGNORE_INDEX
    expected = F.cross_entropy((x @ weight.T)[:, :50], targets, ignore_index=IGNORE_INDEX)
    expected_grads = torch.autograd.grad(3 * expected, (x, weight))
    loss = LinearCrossEntropy.apply(x, weight, targets, 50, max_rows_per_chunk)
    grads = torch.autograd.grad(3 * loss, (x, weight))
    assert torch.allclose(loss, expected, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert torch.allclose(grad, expected_grad, atol=1e-5)
    assert (grads[1][50:] == 0).all()  # the padding rows of the LM head learn nothing


def test_all_targets_ignored_give_pytorchs_nan_loss_but_no_nan_gradient():
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(64, 16, requires_grad=True)
    targets = torch.full((4,), IGNORE_INDEX)
    loss = LinearCrossEntropy.apply(x, weight, targets, 50, 4)
    assert F.cross_entropy(x @ weight.T, targets).isnan() and loss.isnan()
    loss.backward()
    assert (x.grad == 0).all() and (weight.grad == 0).all()
