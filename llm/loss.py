"""The LM head and its loss in one step, for training: the logits over the vocabulary, their
cross-entropy and their gradients, made chunk by chunk of rows.

With GPT-2's vocabulary the logits are a training step's largest tensor (B·T × 50304). Plain
autograd (``GPT.forward``'s loss) keeps all of them from the forward pass to the backward pass,
then reads them again to make their gradient. ``LinearCrossEntropy`` makes that gradient while
each chunk of logits exists, in the same pass over them as the loss, and keeps only the
gradients for the hidden states and the LM head's weight. That pass is a Triton kernel on GPUs
and PyTorch elsewhere (which torch.compile fuses into one kernel). On an H200 this took a
compiled GPT-2 training step at batch 64 from 129 to 122 ms, and the Triton kernel from 118 to
116 ms (in a step with a bf16 residual stream, on another H200). Eager, it would be slower than
autograd: ``GPT.head_loss`` uses it under torch.compile only.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # CUDA builds of PyTorch ship Triton; CPU builds need not
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Whether Triton runs its kernels by its interpreter, on any device: read, as Triton reads it,
# when the kernel below is defined (so the tests set it before importing this module).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

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
    the gradient of ``inv_count · sum(losses)`` for the logits (n, V_padded), in their dtype.
    With the gradient, on GPUs (or under Triton's interpreter) this is the Triton kernel below."""
    if not with_grad:  # PyTorch's own loss: fused kernels in eager mode, autograd's gradient
        losses = F.cross_entropy(
            logits[:, :vocab_size], targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        return losses.float(), None  # bf16 ones (bf16-true) would be summed in bf16
    if _triton_runs_on(logits):
        return torch.ops.llm.cross_entropy_rows(logits, targets, vocab_size, inv_count)
    columns = torch.arange(logits.size(1), device=logits.device)  # (V_padded,)
    # The padded columns are never real tokens: -inf keeps them out of the softmax.
    logits_fp32 = logits.float().masked_fill(columns >= vocab_size, -math.inf)
    row_max = logits_fp32.amax(dim=-1, keepdim=True)  # (n, 1)
    # Each exponential is taken once, kept and scaled for the gradient: compiled, on a 2-core
    # CPU, about 0.2 s for (2048, 50304) fp32 logits, against 0.5 s taking them again.
    exps = torch.exp(logits_fp32 - row_max)  # (n, V_padded)
    exp_sums = exps.sum(dim=-1, keepdim=True)  # (n, 1)
    counted = targets != IGNORE_INDEX  # (n,)
    target_columns = torch.where(counted, targets, 0)[:, None]  # (n, 1); 0 where ignored
    target_logits = logits_fp32.gather(1, target_columns)[:, 0]
    losses = torch.where(counted, (row_max + exp_sums.log())[:, 0] - target_logits, 0.0)
    # d loss / d logits = (softmax - one-hot of the target) / count, row by row. Ignored rows
    # take none (and no NaN from 0 · inf when every row is ignored).
    row_scale = torch.where(counted, inv_count, 0.0)[:, None]  # (n, 1)
    grad = (exps * (row_scale / exp_sums)).scatter_add(1, target_columns, -row_scale)
    return losses, grad.to(logits.dtype)


def _triton_runs_on(tensor: Tensor) -> bool:
    """Whether the Triton kernel takes this tensor: on a GPU, or anywhere under Triton's
    interpreter (``TRITON_INTERPRET=1``, which the tests use on CPUs)."""
    return triton is not None and (tensor.is_cuda or _INTERPRETED)


if triton is not None:

    @triton.jit
    def _load_logits(row_ptr, columns, vocab_size, padded_vocab_size):
        # A block of a row's logits in fp32, -inf in the padded columns (out of the softmax).
        # Masked at the padded width, a multiple of 64, not at the real one: 16-byte loads.
        x = tl.load(row_ptr + columns, mask=columns < padded_vocab_size, other=0.0)
        return tl.where(columns < vocab_size, x.to(tl.float32), float("-inf"))

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr,
        grad_ptr,
        losses_ptr,
        targets_ptr,
        inv_count_ptr,
        vocab_size,
        padded_vocab_size,
        ignore_index,
        BLOCK: tl.constexpr,
    ):
        # One program per row: two reads of it and one write. Read 1 finds the log-normaliser
        # with a running maximum and a sum of exponentials rescaled whenever the maximum grows
        # (online softmax). Read 2 writes the gradient.
        row = tl.program_id(0).to(tl.int64)
        logits_row = logits_ptr + row * padded_vocab_size
        grad_row = grad_ptr + row * padded_vocab_size
        target = tl.load(targets_ptr + row)
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, padded_vocab_size, BLOCK):
            x = _load_logits(logits_row, start + tl.arange(0, BLOCK), vocab_size, padded_vocab_size)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            scaled_sum = tl.sum(tl.exp(x - new_max), axis=0)
            running_sum = running_sum * tl.exp(running_max - new_max) + scaled_sum
            running_max = new_max
        log_norm = running_max + tl.log(running_sum)
        counted = target != ignore_index
        # A target outside the vocabulary makes the loss NaN (which stops training), where
        # reading its logit would read outside the row.
        in_vocab = (target >= 0) & (target < vocab_size)
        target_logit = tl.load(logits_row + tl.where(in_vocab, target, 0)).to(tl.float32)
        loss = tl.where(in_vocab, log_norm - target_logit, float("nan"))
        tl.store(losses_ptr + row, tl.where(counted, loss, 0.0))
        # Ignored rows take no gradient.
        scale = tl.where(counted, tl.load(inv_count_ptr), 0.0)
        for start in range(0, padded_vocab_size, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            x = _load_logits(logits_row, columns, vocab_size, padded_vocab_size)
            probs = tl.exp(x - log_norm)  # 0 in the padded columns
            grad = (probs - tl.where(columns == target, 1.0, 0.0)) * scale
            tl.store(
                grad_row + columns,
                grad.to(grad_ptr.dtype.element_ty),
                mask=columns < padded_vocab_size,
            )

    def _cross_entropy_rows_outputs(logits: Tensor) -> tuple[Tensor, Tensor]:
        """The kernel's outputs, empty: the rows' losses (n,) in fp32 and the gradient
        (n, V_padded), contiguous, in the logits' dtype. ``shape[0]``, not ``len``, keeps a
        compiled graph's number of rows symbolic."""
        return (
            logits.new_empty(logits.shape[0], dtype=torch.float32),
            logits.new_empty(logits.shape),
        )

    @torch.library.custom_op("llm::cross_entropy_rows", mutates_args=())
    def _cross_entropy_rows_triton(
        logits: Tensor, targets: Tensor, vocab_size: int, inv_count: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``cross_entropy_rows`` with its gradient, by the Triton kernel: one op to
        torch.compile, which leaves it as it is."""
        losses, grad = _cross_entropy_rows_outputs(logits)
        # Blocks of 2048 columns, 4 warps: on an H200 the fastest of eight settings, 2.35 ms for
        # (32768, 50304) bf16 logits against 4.0 ms for torch.compile's own kernel.
        _cross_entropy_rows_kernel[(logits.shape[0],)](
            logits.contiguous(),
            grad,
            losses,
            targets.contiguous(),
            inv_count.float(),
            vocab_size,
            logits.shape[1],
            IGNORE_INDEX,
            BLOCK=2048,
            num_warps=4,
        )
        return losses, grad

    @_cross_entropy_rows_triton.register_fake
    def _(
        logits: Tensor, targets: Tensor, vocab_size: int, inv_count: Tensor
    ) -> tuple[Tensor, Tensor]:
        return _cross_entropy_rows_outputs(logits)
