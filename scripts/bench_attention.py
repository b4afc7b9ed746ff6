"""Forward + backward time of every step of the attention ladder, next to torch's own modules.

    python scripts/bench_attention.py            # a small size that runs in seconds on a CPU
    python scripts/bench_attention.py --gpt2     # B=8, T=1024, d=768, 12 heads
    python scripts/bench_attention.py --gpt2 --tokens 4096 --window 256   # sliding window

Prints one row per implementation with its median time in fp32 and under bf16 autocast, and
its time relative to raw SDPA with the same projections. With ``--window``, the rows are
instead RoPE attention with a full causal mask against a sliding window computed by SDPA with
a band mask and by FlexAttention (forward only on a CPU, where FlexAttention has no gradients).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    RotaryAttention,
    SelfAttention,
    SlidingWindowAttention,
    simple_self_attention,
)
from llm.checks import ArgumentParser, at_least
from llm.errors import one_line_errors
from llm.hardware import device_from_name


def raw_sdpa(fused: MultiHeadAttention) -> Callable[[Tensor], Tensor]:
    """The least code that computes causal multi-head attention: the fused module's own
    projections around one SDPA call, with no options or checks."""

    def attend(x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = fused.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, fused.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fused.out_proj(y.transpose(1, 2).reshape(B, T, C))

    return attend


def torch_multihead(
    d: int, heads: int, tokens: int, device: torch.device
) -> Callable[[Tensor], Tensor]:
    attn = nn.MultiheadAttention(d, heads, batch_first=True, device=device)
    future = torch.ones(tokens, tokens, dtype=torch.bool, device=device).triu(1)
    return lambda x: attn(x, x, x, attn_mask=future, is_causal=True, need_weights=False)[0]


def implementations(
    d: int, heads: int, tokens: int, device: torch.device
) -> dict[str, Callable[[Tensor], Tensor]]:
    fused = MultiHeadAttention(d, d, tokens, dropout=0.0, num_heads=heads).to(device)
    return {
        "1 simple_self_attention": simple_self_attention,
        "2 SelfAttention (1 head)": SelfAttention(d, d).to(device),
        "3 CausalAttention (1 head)": CausalAttention(d, d, tokens, dropout=0.0).to(device),
        "4 MultiHeadAttentionWrapper": MultiHeadAttentionWrapper(
            d, d, tokens, dropout=0.0, num_heads=heads
        ).to(device),
        "5 MultiHeadAttention (fused)": fused,
        "torch.nn.MultiheadAttention": torch_multihead(d, heads, tokens, device),
        "raw SDPA, same projections": raw_sdpa(fused),
    }


def window_implementations(
    d: int, heads: int, tokens: int, window: int, device: torch.device
) -> dict[str, Callable[[Tensor], Tensor]]:
    """Full causal RoPE attention, and the same weights with a sliding window by each kernel."""
    full = RotaryAttention(d, d, tokens, dropout=0.0, num_heads=heads).to(device)
    band, flex = (
        SlidingWindowAttention(
            d, d, tokens, dropout=0.0, num_heads=heads, window=window, use_flex=use_flex
        ).to(device)
        for use_flex in (False, True)
    )
    band.load_state_dict(full.state_dict())
    flex.load_state_dict(full.state_dict())
    return {
        "RoPE attention, full causal (SDPA)": full,
        f"window {window}, SDPA + band mask": band,
        f"window {window}, FlexAttention": flex,
    }


def time_forward_backward(
    attend: Callable[[Tensor], Tensor], x: Tensor, bf16: bool, repeats: int, backward: bool = True
) -> float:
    """Median seconds of one forward and (unless ``backward`` is False) backward pass."""
    autocast = (
        torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast, torch.set_grad_enabled(backward):
            out = attend(x)
        if backward:
            out.float().sum().backward()

    times = []
    for i in range(repeats + 2):  # two warm-up passes, not timed
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# Sizes: batch, tokens, model width and heads, by default and as GPT-2 small (--gpt2).
SMALL_SIZES = {"batch": 4, "tokens": 256, "dim": 256, "heads": 8}
GPT2_SIZES = {"batch": 8, "tokens": 1024, "dim": 768, "heads": 12}


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    for size, small in SMALL_SIZES.items():
        parser.add_argument(
            f"--{size}", type=at_least(1), help=f"default {small}, {GPT2_SIZES[size]} with --gpt2"
        )
    parser.add_argument(
        "--gpt2", action="store_true", help="GPT-2 small's sizes, for those not given"
    )
    parser.add_argument("--window", type=int, help="compare sliding-window kernels instead")
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args()
    for size, default in (GPT2_SIZES if args.gpt2 else SMALL_SIZES).items():
        if getattr(args, size) is None:
            setattr(args, size, default)
    if args.dim % args.heads:
        parser.error(f"--dim ({args.dim}) must be divisible by --heads ({args.heads})")
    if args.window is not None and not 0 < args.window < args.tokens:
        parser.error(f"--window must be between 1 and --tokens - 1, got {args.window}")

    device = device_from_name(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim, device=device, requires_grad=True)
    backward = args.window is None or x.is_cuda
    if args.window is None:
        attends = implementations(args.dim, args.heads, args.tokens, device)
        baseline = "raw SDPA, same projections"
    else:
        attends = window_implementations(args.dim, args.heads, args.tokens, args.window, device)
        baseline = next(iter(attends))
    rows = {}
    for name, attend in attends.items():
        rows[name] = [
            time_forward_backward(attend, x, bf16, args.repeats, backward) for bf16 in (0, 1)
        ]

    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name() if x.is_cuda else f"CPU, {threads} threads"
    print(
        f"{'forward+backward' if backward else 'forward only'}, B={args.batch} T={args.tokens} "
        f"d={args.dim} heads={args.heads}, {device_name}, torch {torch.__version__}, "
        f"median of {args.repeats}"
    )
    short = "raw SDPA" if args.window is None else "full causal"
    print(f"| {'implementation':<36} | fp32 ms | bf16 ms | fp32 vs {short} | bf16 vs {short} |")
    print(f"|{'-' * 38}|--------:|--------:|{'-' * (len(short) + 10)}:|{'-' * (len(short) + 10)}:|")
    base = rows[baseline]
    for name, (fp32, bf16) in rows.items():
        print(
            f"| {name:<36} | {fp32 * 1e3:7.1f} | {bf16 * 1e3:7.1f} "
            f"| {fp32 / base[0]:{len(short) + 7}.2f}x | {bf16 / base[1]:{len(short) + 7}.2f}x |"
        )
    if args.window is not None:
        band, flex = list(attends.values())[1:]
        with torch.no_grad():
            difference = (band(x) - flex(x)).abs().max().item()
        print(f"FlexAttention vs SDPA + band mask, fp32 outputs: max |difference| {difference:.1e}")
        return
    fused, wrapper = rows["5 MultiHeadAttention (fused)"], rows["4 MultiHeadAttentionWrapper"]
    for i, precision in enumerate(("fp32", "bf16")):
        print(
            f"{precision}: fused is {wrapper[i] / fused[i]:.2f}x faster than the wrapper "
            f"(target >= 2x) and {100 * (fused[i] / base[i] - 1):+.1f}% vs raw SDPA (target <= +5%)"
        )


if __name__ == "__main__":
    with one_line_errors():
        main()
