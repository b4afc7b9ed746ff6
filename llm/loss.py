"""The LM head and its loss in one step, for training: the logits over the vocabulary, their
cross-entropy and their gradients, made chunk by chunk of rows.

With GPT-2's vocabulary the logits are a training step's largest tensor (B·T × 50304). Plain
autograd (``GPT.forward``'s loss) keeps all of them from the forward pass to the backward pass,
then reads them again to make their gradient. ``LinearCrossEntropy`` makes that gradient while
each chunk of logits exists, in the same pass over them as the loss (which torch.compile fuses
into one kernel), and keeps only the gradients for the hidden states and the LM head's weight.
On an H200 this took a compiled GPT-2 training step at batch 64 from 129 to 122 ms. Eager, it
would be slower than autograd: ``GPT.head_loss`` uses it under torch.compile only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# The target that counts for nothing in the loss (PyTorch's default): padding, say.
IGNORE_INDEX = -100


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    vocab_size: int,
    max_rows_per_chunk: int,
    with_grads: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The mean cross-entropy of the logits x @ weightᵀ (N, V_padded) over their first
    ``vocab_size`` columns against targets (N,), where ``IGNORE_INDEX`` counts for nothing. With
    ``with_grads``, also the loss's gradients for x (N, C) and weight (V_padded, C); else
    (loss, None, None). The logits are made in the fewest even chunks of at most
    ``max_rows_per_chunk`` rows and dropped after use: one chunk of them exists at once."""
    total = len(targets)
    if total <= max_rows_per_chunk:  # one chunk, with no arithmetic on the size that would
        chunks = [slice(0, total)]  # fix it in a compiled graph: one graph serves every size
    else:
        size = math.ceil(total / math.ceil(total / max_rows_per_chunk))
        chunks = [slice(start, start + size) for start in range(0, total, size)]
    inv_count = 1 / (targets != IGNORE_INDEX).sum()  # (), kept on the device: no host sync
    loss = torch.zeros((), device=x.device)
    grad_x = torch.empty_like(x) if with_grads else None
    # Summed over chunks in fp32 whatever the weight's dtype.
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grads else None
    for rows in chunks:
        logits = x[rows] @ weight.T  # (rows, V_padded), in autocast's dtype if on
        row_losses, grad_logits = cross_entropy_rows(
            logits, targets[rows], vocab_size, inv_count, with_grads
        )
        loss = loss + row_losses.sum()
        if with_grads:
            assert grad_x is not None and grad_weight is not None and grad_logits is not None
            grad_x[rows] = grad_logits @ weight  # (rows, C)
            grad_weight += grad_logits.T @ x[rows]  # (V_padded, C)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss * inv_count, grad_x, grad_weight


class LinearCrossEntropy(torch.autograd.Function):
    """``linear_cross_entropy`` with its gradients worked out in the forward pass, chunk by
    chunk, while each chunk's logits exist; the backward pass only scales them by the loss's
    own gradient (1, or 1/n under gradient accumulation). Not for fp16: the logits' gradient,
    a (rows, V) tensor of values about 1/(B·T), would underflow before fp16's loss scale reached
    it in the backward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        targets: Tensor,
        vocab_size: int,
        max_rows_per_chunk: int,
    ) -> Tensor:
        loss, grad_x, grad_weight = linear_cross_entropy(
            x, weight, targets, vocab_size, max_rows_per_chunk, with_grads=True
        )
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor
    ) -> tuple[Tensor | None, ...]:
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None


def cross_entropy_rows(
    logits: Tensor, targets: Tensor, vocab_size: int, inv_count: Tensor, with_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Each row's cross-entropy (n,), in fp32, for logits (n, V_padded) over their first
    ``vocab_size`` columns (0 where the target is ``IGNORE_INDEX``) and, with ``with_grad``,
    the gradient of ``inv_count · sum(losses)`` for the logits (n, V_padded), in their dtype."""
    if not with_grad:  # PyTorch's own loss: fused kernels in eager mode, autograd's gradient
        losses = F.cross_entropy(
            logits[:, :vocab_size], targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        return losses.float(), None  # bf16 ones (bf16-true) would be summed in bf16
    columns = torch.arange(logits.size(1), device=logits.device)  # (V_padded,)
    # The padded columns are never real tokens: -inf keeps them out of the softmax.
    logits_fp32 = logits.float().masked_fill(columns >= vocab_size, -math.inf)
    log_norm = torch.logsumexp(logits_fp32, dim=-1)  # (n,)
    counted = targets != IGNORE_INDEX  # (n,)
    target_logits = logits_fp32.gather(1, torch.where(counted, targets, 0)[:, None])[:, 0]
    losses = torch.where(counted, log_norm - target_logits, 0.0)
    # d loss / d logits = (softmax - one-hot of the target) / count, row by row. Written as
    # pointwise steps after one reduction, torch.compile makes the whole function one kernel.
    probs = torch.exp(logits_fp32 - log_norm[:, None])  # (n, V_padded)
    one_hot = (columns == targets[:, None]).float()  # (n, V_padded)
    # Ignored rows take none (and no NaN from 0 · inf when every row is ignored).
    grad = (probs - one_hot) * torch.where(counted, inv_count, 0.0)[:, None]
    return losses, grad.to(logits.dtype)
