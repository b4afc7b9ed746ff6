"""Tokens/s (and MFU where the device's peak is known) of the training step.

    python scripts/bench_train.py                        # gpt-micro, B=16, T=128, on this machine
    python scripts/bench_train.py --preset gpt2 --batch 16 --tokens 1024   # on a GPU

Rows: a plain PyTorch loop in fp32 eager, with bf16 autocast, and with bf16 plus
torch.compile; then the real Lightning path (GPTLightningModule + Trainer) in the same
precision and compile setting as the last plain row, and on a GPU the same with Lightning's
ThroughputMonitor (which waits for the GPU after every step) or llm's TokenThroughputMonitor
(which waits only on logging steps). Each row is timed over all its steps after the warm-up as
one span, so the host may run ahead of the GPU as in real training. Every row trains the same
model on the same random batches held in (on a GPU, pinned) memory, so the table compares the
step itself, not data loading. A second table times the output head alone (``GPT.head_loss``:
the logits over the vocabulary, the loss and their gradients), eager and compiled, and its share
of the whole step. A third times the step's matmuls and attention alone, with none of the
memory-bound work around them: a floor for the step, and so a ceiling for its MFU with these
kernels.
``--compile-mode max-autotune-no-cudagraphs`` compiles every compiled row with kernel tuning.
"""

from __future__ import annotations

# llm first: importing it lets torch back large CPU tensors with huge pages, which must be
# settled before anything allocates one (see llm/__init__.py).
import llm  # noqa: F401

# isort: split
import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llm.callbacks import TokenThroughputMonitor
from llm.checks import ArgumentParser, at_least
from llm.errors import ctrl_c_as_interrupt, one_line_errors
from llm.hardware import device_from_name, peak_flops
from llm.model import GPT, GPTConfig
from llm.run import quiet_lightning
from llm.training import COMPILE_MODES, GPTLightningModule


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device``, or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def plain_loop(
    config: GPTConfig,
    batches: list[torch.Tensor],
    device: torch.device,
    bf16: bool,
    compile_mode: str | None,
    warmup: int,
) -> float:
    """Seconds per optimizer step of the least code that trains the model, compiled in
    ``compile_mode`` or, with None, eager (as in the other loops here)."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    loss_of = model.loss if compile_mode is None else torch.compile(model.loss, mode=compile_mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    clock = StepClock(device, warmup, len(batches))
    for batch in batches:
        clock.batch_start()
        batch = batch.to(device, non_blocking=True)
        with autocast(device, bf16):
            loss = loss_of(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.batch_end()
    return clock.seconds_per_step()


def head_only(
    config: GPTConfig,
    batches: list[torch.Tensor],
    device: torch.device,
    bf16: bool,
    compile_mode: str | None,
    warmup: int,
) -> float:
    """Seconds of the output head alone (final norm, LM head over the vocabulary, loss),
    forward and backward, on random hidden states."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    head_loss = model.head_loss
    if compile_mode is not None:
        head_loss = torch.compile(head_loss, mode=compile_mode)
    shape = (*batches[0][:, 1:].shape, config.n_embd)  # (B, T, C)
    dtype = torch.bfloat16 if bf16 else torch.float32  # the residual stream's, as in training
    hidden = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in batches]
    clock = StepClock(device, warmup, len(batches))
    for batch, states in zip(batches, hidden, strict=True):
        clock.batch_start()
        with autocast(device, bf16):
            loss = head_loss(states, batch[:, 1:].to(device, non_blocking=True))
        loss.backward()
        clock.batch_end()
    return clock.seconds_per_step()


def linear_shapes(config: GPTConfig) -> list[tuple[int, int]]:
    """(in, out) features of every linear layer of the model: each block's query/key/value
    projection, attention output and MLP, then the LM head over the padded vocabulary."""
    with torch.device("meta"):  # the shapes only: no memory, no initialisation
        model = GPT(config)
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def kernels_alone(
    config: GPTConfig, batch_size: int, tokens: int, device: torch.device, warmup: int, steps: int
) -> tuple[float, float]:
    """Seconds per training step of the step's matmuls alone (every linear layer's forward
    product and its two backward ones) and of its attention alone (SDPA's causal forward and
    backward), in bf16 on random data: the work of the matrix units, without the memory-bound
    work around it (norms, GELU, residual adds, softmax and loss, optimizer). Every layer
    attends over its whole causal context: sliding windows are not modelled."""

    def bf16(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)

    def seconds_of(work: Callable[[], object]) -> float:
        clock = StepClock(device, warmup, warmup + steps)
        for _ in range(warmup + steps):
            clock.batch_start()
            work()
            clock.batch_end()
        return clock.seconds_per_step()

    c, rows = config, batch_size * tokens
    linears = linear_shapes(config)
    matmuls = 0.0
    for fan_in, fan_out in sorted(set(linears)):
        x, w, dy = bf16(rows, fan_in), bf16(fan_out, fan_in), bf16(rows, fan_out)
        # y = x w^T forward; dx = dy w and dw = dy^T x backward
        seconds = seconds_of(lambda x=x, w=w, dy=dy: (x @ w.T, dy @ w, dy.T @ x))
        matmuls += seconds * linears.count((fan_in, fan_out))
    q = bf16(batch_size, c.n_head, tokens, c.head_size).requires_grad_()  # (B, nh, T, hs)
    k, v = (bf16(batch_size, c.kv_heads, tokens, c.head_size).requires_grad_() for _ in "kv")
    grad = torch.randn_like(q)

    def attention() -> None:
        gqa = c.kv_heads != c.n_head
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        torch.autograd.grad(out, (q, k, v), grad)

    return matmuls, seconds_of(attention) * c.n_layer


class StepClock:
    """Times the steps after ``warmup`` as one span, waiting for the device only at its two
    ends, so the host may run ahead of the GPU as it does in real training."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.step, self.start, self.seconds = 0, 0.0, 0.0

    def batch_start(self) -> None:
        if self.step == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def batch_end(self) -> None:
        self.step += 1
        if self.step == self.steps:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.start

    def seconds_per_step(self) -> float:
        return self.seconds / (self.steps - self.warmup)


class DiscardingLogger(Logger):
    """Takes every logged value as a real logger would, so that Lightning reads them from the
    device on logging steps as in training, and keeps none."""

    name, version = "discard", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class ClockCallback(L.Callback):
    """``StepClock`` inside a Lightning Trainer (stopped before the Trainer's teardown)."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args: Any) -> None:
        self.clock.batch_start()

    def on_train_batch_end(self, *args: Any) -> None:
        self.clock.batch_end()


def lightning_loop(
    config: GPTConfig,
    batches: list[torch.Tensor],
    device: torch.device,
    bf16: bool,
    compile_mode: str | None,
    warmup: int,
    monitor: L.Callback | None = None,
) -> float:
    """Seconds per optimizer step through GPTLightningModule and a Lightning Trainer, logging
    every 10 steps as the default config does, with ``monitor`` as an extra callback."""
    torch.manual_seed(0)
    module = GPTLightningModule(
        model=config.to_dict(),
        tokenizer={"name": "gpt2", "path": None},
        compile_model=compile_mode is not None,
        compile_mode=compile_mode or "default",
    )
    data = torch.stack(batches)
    loader = DataLoader(
        TensorDataset(data[:, :, :-1].flatten(0, 1), data[:, :, 1:].flatten(0, 1)),
        batch_size=batches[0].size(0),
        pin_memory=device.type == "cuda",
    )
    clock = StepClock(device, warmup, len(batches))
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if bf16 else "32-true",
        max_steps=len(batches),
        gradient_clip_val=1.0,
        logger=DiscardingLogger(),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ClockCallback(clock), *([monitor] if monitor else [])],
    )
    with ctrl_c_as_interrupt():
        trainer.fit(module, train_dataloaders=loader)
    return clock.seconds_per_step()


def main() -> None:
    quiet_lightning()
    # The bench times training steps only and gives the Trainer no validation data on purpose.
    warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no")
    # Fewer steps than a logging interval are fine for a quick look.
    warnings.filterwarnings("ignore", message="The number of training batches")
    # Each Lightning row would print its setup lines ("GPU available: ...") inside the table.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt-micro")
    parser.add_argument("--batch", type=at_least(1), default=16)
    parser.add_argument("--tokens", type=at_least(1), default=128)
    parser.add_argument("--steps", type=at_least(1), default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=at_least(0), default=8, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--compile-mode", default="default", choices=COMPILE_MODES, help="for the compiled rows"
    )
    args = parser.parse_args()

    device = device_from_name(args.device)
    config = GPTConfig.from_preset(args.preset, context_length=args.tokens)
    generator = torch.Generator().manual_seed(0)
    steps = args.steps + args.warmup
    batches = [
        torch.randint(config.vocab_size, (args.batch, args.tokens + 1), generator=generator)
        for _ in range(steps)
    ]
    if device.type == "cuda":
        # Pinned, as the datamodule's loader gives them: a copy from pageable memory would wait
        # for the GPU to finish the previous step, so the host could never run ahead.
        batches = [batch.pin_memory() for batch in batches]
    flops_per_step = GPT(config).flops_per_token() * args.batch * args.tokens
    peak = peak_flops(device, torch.bfloat16)

    compiled = args.compile_mode  # the compile mode of the compiled rows; None is eager
    rows = [
        ("plain loop, fp32 eager", plain_loop, False, None),
        ("plain loop, bf16 autocast", plain_loop, True, None),
        ("plain loop, bf16 + compile", plain_loop, True, compiled),
        ("Lightning, bf16 + compile", lightning_loop, True, compiled),
    ]
    if device.type == "cuda":  # on a CPU every step ends with the work done: nothing to wait for
        stock = ThroughputMonitor(lambda batch: batch[0].size(0), lambda batch: batch[0].numel())
        rows += [
            (
                "Lightning + its ThroughputMonitor (waits every step)",
                functools.partial(lightning_loop, monitor=stock),
                True,
                compiled,
            ),
            (
                "Lightning + llm's TokenThroughputMonitor",
                functools.partial(lightning_loop, monitor=TokenThroughputMonitor()),
                True,
                compiled,
            ),
        ]
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"{args.preset}, B={args.batch} T={args.tokens}, {name}, torch {torch.__version__}, "
        f"mean of {args.steps} steps after {args.warmup} warm-up steps, "
        f"compile mode {args.compile_mode}"
    )
    print("| training step | s/step | tokens/s | vs fp32 eager | MFU |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    for label, loop, bf16, compile_mode in rows:
        seconds = loop(config, batches, device, bf16, compile_mode, args.warmup)
        results[label] = seconds
        base = results["plain loop, fp32 eager"]
        mfu = f"{flops_per_step / seconds / peak:.1%}" if peak else "n/a"
        speed = f"{args.batch * args.tokens / seconds:,.0f} | {base / seconds:.2f}x"
        print(f"| {label} | {seconds:.4f} | {speed} | {mfu} |", flush=True)
    ratio = results["plain loop, bf16 + compile"] / results["Lightning, bf16 + compile"]
    print(f"Lightning path at {ratio:.1%} of the plain loop's tokens/s (target >= 95%)")

    print("\n| output head alone (final norm, LM head, loss), bf16 | s/step | share of the step |")
    print("|---|---:|---:|")
    for label, compile_mode, step in (
        ("eager", None, results["plain loop, bf16 autocast"]),
        ("compiled", compiled, results["plain loop, bf16 + compile"]),
    ):
        seconds = head_only(config, batches, device, True, compile_mode, args.warmup)
        print(f"| {label} | {seconds:.4f} | {seconds / step:.0%} |")

    step = results["plain loop, bf16 + compile"]
    matmuls, attention = kernels_alone(
        config, args.batch, args.tokens, device, args.warmup, args.steps
    )
    print(
        "\n| kernels alone, bf16 (no memory-bound work) | s/step | share of the compiled step "
        "| MFU of a step this long |"
    )
    print("|---|---:|---:|---:|")
    floor = matmuls + attention
    for label, seconds, mfu in (
        ("matmuls: every linear layer, forward and backward", matmuls, ""),
        ("attention: SDPA, causal, forward and backward", attention, ""),
        (
            "both: the floor of the step",
            floor,
            f"{flops_per_step / floor / peak:.1%}" if peak else "n/a",
        ),
    ):
        print(f"| {label} | {seconds:.4f} | {seconds / step:.0%} | {mfu} |")


if __name__ == "__main__":
    with one_line_errors():
        main()
