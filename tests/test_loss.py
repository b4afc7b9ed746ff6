"""The LM head's loss for training: each row's cross-entropy and its gradient by hand, the
chunked linear cross-entropy against plain autograd, and the Triton kernel (run by Triton's
interpreter on CPUs) against PyTorch."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys

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


# Run in a process of its own: Triton reads TRITON_INTERPRET when llm.loss defines the kernel.
KERNEL_AGAINST_PYTORCH = """
import json, torch, torch.nn.functional as F
import llm.loss
from llm.loss import IGNORE_INDEX, LinearCrossEntropy, cross_entropy_rows

def pytorch_rows(*args):
    kernel_runs_on, llm.loss._triton_runs_on = llm.loss._triton_runs_on, lambda tensor: False
    try:
        return cross_entropy_rows(*args, with_grad=True)
    finally:
        llm.loss._triton_runs_on = kernel_runs_on

torch.manual_seed(0)
# 5000 real columns padded to 5056: three of the kernel's 2048-column blocks a row, so the
# running maximum and sum carry over blocks. Targets in the first, middle and last block.
targets = torch.tensor([4999, 0, IGNORE_INDEX, 2500, 4096])
inv_count = 1 / (targets != IGNORE_INDEX).sum()
report = {"kernel_runs_on_cpu": llm.loss._triton_runs_on(targets)}
for dtype in (torch.float32, torch.bfloat16):
    logits = (torch.randn(5, 5056) * 3).to(dtype)
    logits[1, 4500] = 30  # a row whose maximum is in its last block
    losses, grad = torch.ops.llm.cross_entropy_rows(logits, targets, 5000, inv_count)
    expected_losses, expected_grad = pytorch_rows(logits, targets, 5000, inv_count)
    report[str(dtype)] = {
        "dtype": str(grad.dtype),
        "loss_error": (losses - expected_losses).abs().max().item(),
        "grad_error": (grad.float() - expected_grad.float()).abs().max().item(),
        "padding_and_ignored_grad": grad[:, 5000:].abs().sum().item() + grad[2].abs().sum().item(),
    }
# Every target ignored: the count is 0 and inv_count inf, yet the gradient is 0, not NaN. A
# target outside the vocabulary (a padded column, or past the row) makes its row's loss NaN.
logits = torch.randn(3, 5056)
ignored = torch.full((3,), IGNORE_INDEX)
losses, grad = torch.ops.llm.cross_entropy_rows(logits, ignored, 5000, 1 / torch.tensor(0))
report["all_ignored"] = {"losses": losses.abs().sum().item(), "grad": grad.abs().sum().item()}
outside = torch.tensor([5000, 9999, 7])
losses, _ = torch.ops.llm.cross_entropy_rows(logits, outside, 5000, torch.tensor(1 / 3))
report["outside_nan"] = losses.isnan().tolist()
# Compiled with dynamic shapes, one graph serves any number of rows.
graphs = []
def count_graphs(graph_module, example_inputs):
    graphs.append(graph_module)
    return graph_module.forward
rows_loss = torch.compile(
    lambda lg, t: cross_entropy_rows(lg, t, 5000, torch.tensor(0.5), with_grad=True),
    backend=count_graphs, dynamic=True,
)
for rows in (2, 3):
    rows_loss(torch.randn(rows, 5056), torch.zeros(rows, dtype=torch.long))
report["graphs"] = len(graphs)
x = torch.randn(6, 16, requires_grad=True)
weight = torch.randn(5056, 16, requires_grad=True)
targets = torch.tensor([1, 4999, IGNORE_INDEX, 3000, 2048, 7])
expected = F.cross_entropy((x @ weight.T)[:, :5000], targets, ignore_index=IGNORE_INDEX)
expected_grads = torch.autograd.grad(expected, (x, weight))
loss = LinearCrossEntropy.apply(x, weight, targets, 5000, 4)  # two chunks
grads = torch.autograd.grad(loss, (x, weight))
report["linear"] = {
    "loss_error": (loss - expected).abs().item(),
    "grad_error": max((g - e).abs().max().item() for g, e in zip(grads, expected_grads)),
}
print(json.dumps(report))
"""


def major_minor(module: str) -> tuple[int, int]:
    """The version of an installed module, whichever package installed it (torch's nightly
    builds ship Triton as pytorch-triton)."""
    major, minor = importlib.import_module(module).__version__.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed (pip install triton; the dev extra installs it on Linux)",
)
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is not None
    and major_minor("triton") < (3, 7)
    and major_minor("numpy") >= (2, 4),
    # The interpreter of Triton 3.6 and older (which torch 2.11's CUDA build pins) reads a loop
    # bound with int() of a 1-element array, which NumPy 2.4 refuses (triton-lang/triton#9171).
    reason="Triton < 3.7's interpreter fails under NumPy >= 2.4: pip install 'numpy<2.4'",
)
def test_triton_kernel_equals_pytorch_under_the_interpreter():
    result = subprocess.run(
        [sys.executable, "-c", KERNEL_AGAINST_PYTORCH],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kernel_runs_on_cpu"]  # so cross_entropy_rows takes the kernel here too
    fp32, bf16 = report["torch.float32"], report["torch.bfloat16"]
    assert fp32["dtype"] == "torch.float32" and bf16["dtype"] == "torch.bfloat16"
    assert fp32["loss_error"] < 1e-5 and fp32["grad_error"] < 1e-7
    # Both ways the gradient is worked out in fp32: in bf16 they differ by at most one rounding.
    assert bf16["loss_error"] < 1e-4 and bf16["grad_error"] <= 2**-9
    assert fp32["padding_and_ignored_grad"] == 0 and bf16["padding_and_ignored_grad"] == 0
    assert report["linear"]["loss_error"] < 1e-5 and report["linear"]["grad_error"] < 1e-5
    assert report["all_ignored"] == {"losses": 0, "grad": 0}
    assert report["outside_nan"] == [True, True, False]
    assert report["graphs"] == 1
