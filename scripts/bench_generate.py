"""Generation speed on the CPU: tokens/s for a 124M GPT-2-sized model with random weights.

    python scripts/bench_generate.py                 # 256 new tokens, all rows (a few minutes)
    python scripts/bench_generate.py --new-tokens 64 --skip-no-cache --threads 1
    python scripts/bench_generate.py --modern        # modern attention tables instead (~2 min)

Greedy decoding from a 16-token prompt, timed from the prompt to the last token, in these ways:
our model with its KV cache (bf16 and fp32 weights), without the cache (the whole window
recomputed for every token, bf16 weights), and transformers' ``GPT2LMHeadModel.generate`` (its
cache on, fp32 and bf16 weights) with the same weights, exported by ``llm.checkpoint.save_hf``.
Generation reads every weight once per token, so on a CPU it is bound by memory bandwidth: bf16
weights halve the bytes read (and CPUs with AVX-512 BF16 or AMX multiply them natively). Prints
a markdown table.

``--modern`` prints two other tables instead. KV-cache memory and decode tokens/s of the
124M model with ``n_kv_head`` in {12, 3, 1} (grouped-query attention), decoding after a long
prompt so that the cache matters; and a sliding window against full attention at a long
context (a 4096-token RoPE model): prefill time (SDPA band mask, and compiled FlexAttention,
which skips the blocks outside the band) and decode speed and cache memory. They decode at most
64 new tokens, so that the long prompt and the tokens after it fit the 124M model's context.

The transformers rows need the dev extra (``pip install -e ".[dev]"``); ``--modern`` does not.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable

import torch
from torch import Tensor

from llm.attention import SlidingWindowAttention
from llm.checkpoint import save_hf
from llm.checks import ArgumentParser, at_least
from llm.errors import fail, one_line_errors
from llm.generate import generate_tokens
from llm.model import GPT, GPTConfig


def tokens_per_second(run: Callable[[int], Tensor], new_tokens: int) -> tuple[float, Tensor]:
    """Speed of ``run(new_tokens)``, after a short warm-up run, and the tokens it produced."""
    run(4)  # first calls initialise kernels and allocator pools
    start = time.perf_counter()
    tokens = run(new_tokens)
    return new_tokens / (time.perf_counter() - start), tokens


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
        return names[0] if names else platform.processor()
    except OSError:
        return platform.processor()


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=at_least(1), default=256)
    parser.add_argument("--skip-no-cache", action="store_true", help="skip the slow no-cache row")
    parser.add_argument(
        "--threads",
        type=at_least(1),
        help="torch threads (default: torch's); 1 is steadier on a busy CPU",
    )
    parser.add_argument(
        "--modern",
        action="store_true",
        help="the modern attention tables instead (at most 64 new tokens)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.modern:
        modern_attention_tables(args.new_tokens)
        return

    try:  # the dev extra; imported here so --help and --modern work without it
        import transformers
    except ModuleNotFoundError as error:
        if error.name != "transformers":  # installed, but broken: its own error says why
            raise
        fail('the transformers rows need transformers: pip install -e ".[dev]" (or run --modern)')

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16))
    with tempfile.TemporaryDirectory() as folder:
        save_hf(model, folder)
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()

    def ours(dtype: torch.dtype, use_cache: bool) -> Callable[[int], Tensor]:
        model.to(dtype)
        return lambda n: generate_tokens(model, prompt, n, temperature=0, use_cache=use_cache)

    def theirs(dtype: torch.dtype) -> Callable[[int], Tensor]:
        hf_model.to(dtype)
        return lambda n: hf_model.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )

    rows: dict[str, Callable[[], Callable[[int], Tensor]]] = {
        "llm, KV cache, bf16 weights": lambda: ours(torch.bfloat16, use_cache=True),
        "llm, KV cache, fp32": lambda: ours(torch.float32, use_cache=True),
        "llm, no cache, bf16 weights": lambda: ours(torch.bfloat16, use_cache=False),
        "transformers generate, fp32": lambda: theirs(torch.float32),
        "transformers generate, bf16 weights": lambda: theirs(torch.bfloat16),
    }
    if args.skip_no_cache:
        rows = {name: make for name, make in rows.items() if "no cache" not in name}
    speeds, outputs = {}, {}
    with torch.inference_mode():
        for name, make in rows.items():
            speeds[name], outputs[name] = tokens_per_second(make(), args.new_tokens)
            print(f"{name}: {speeds[name]:.1f} tokens/s", flush=True)

    print(
        f"\n{args.new_tokens} new tokens, greedy, 124M GPT-2-sized model, random weights; "
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}\n"
    )
    hf32 = speeds["transformers generate, fp32"]
    print("| generation | tokens/s | vs transformers fp32 |")
    print("|---|---:|---:|")
    for name, speed in speeds.items():
        print(f"| {name} | {speed:.1f} | {speed / hf32:.2f}x |")
    same = torch.equal(outputs["llm, KV cache, fp32"], outputs["transformers generate, fp32"])
    print(f"\nllm and transformers (fp32) generate the same tokens: {'yes' if same else 'NO'}")
    if "llm, no cache, bf16 weights" in speeds:
        ratio = speeds["llm, KV cache, bf16 weights"] / speeds["llm, no cache, bf16 weights"]
        print(f"KV cache vs no cache (bf16 weights): {ratio:.1f}x (target >= 5x)")
    best = speeds["llm, KV cache, bf16 weights"]
    print(f"llm KV cache bf16 vs transformers fp32: {best / hf32:.2f}x (target >= 1.5x)")


def decode(model: GPT, prompt: Tensor, new_tokens: int) -> tuple[float, float, int]:
    """Prefill ``prompt`` into fresh KV caches, then greedily decode ``new_tokens`` one at a
    time: (prefill seconds, decode tokens/s, KV-cache bytes at the end)."""
    caches = model.new_kv_caches()
    start = time.perf_counter()
    logits, _ = model(prompt, kv_caches=caches)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, _ = model(logits[:, -1:].argmax(-1), kv_caches=caches)
    speed = new_tokens / (time.perf_counter() - start)
    return prefill, speed, sum(cache.nbytes for cache in caches)


def modern_attention_tables(new_tokens: int) -> None:
    new_tokens = min(new_tokens, 64)
    torch.manual_seed(0)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; fp32\n")
    prompt_length = 896
    print(
        f"Grouped-query attention: 124M GPT-2 (12 layers, 12 query heads), {prompt_length}-token "
        f"prompt, then {new_tokens} tokens decoded one by one with the KV cache\n"
    )
    print("| n_kv_head | parameters | KV cache (MiB) | vs n_head | prefill (s) | decode tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    prompt = torch.randint(0, 50257, (1, prompt_length))
    full_cache = None
    for kv_heads in (12, 3, 1):
        model = GPT(GPTConfig.from_preset("gpt2", n_kv_head=kv_heads)).eval()
        with torch.inference_mode():
            decode(model, prompt[:, :32], 4)  # warm-up
            prefill, speed, cache = decode(model, prompt, new_tokens)
        full_cache = full_cache or cache
        print(
            f"| {kv_heads} | {model.num_params() / 1e6:.1f}M | {cache / 2**20:.1f} | "
            f"{cache / full_cache:.3f} | {prefill:.2f} | {speed:.1f} |",
            flush=True,
        )

    context, window = 4096, 256
    prompt = torch.randint(0, 50257, (1, context - new_tokens))
    print(
        f"\nSliding window: a RoPE model with 6 layers, 8 heads, 512 wide, context {context}; "
        f"{prompt.size(1)}-token prompt, then {new_tokens} tokens decoded\n"
    )
    print("| attention | prefill kernel | prefill (s) | decode tokens/s | KV cache (MiB) |")
    print("|---|---|---:|---:|---:|")
    base = dict(n_layer=6, n_head=8, n_embd=512, context_length=context, pos_embedding="rope")
    for name, options in (("full causal", {}), (f"window {window}", {"sliding_window": window})):
        model = GPT(GPTConfig.from_preset("gpt2", **base, **options)).eval()
        kernels = ["SDPA (is_causal)"] if not options else ["SDPA + band mask", "FlexAttention"]
        for kernel in kernels:
            for block in model.blocks:
                if isinstance(block.attn, SlidingWindowAttention):
                    block.attn.use_flex = kernel == "FlexAttention"
            with torch.inference_mode():
                if kernel == "FlexAttention":  # compile once, outside the timing
                    model(prompt)
                decode(model, prompt[:, :32], 4)  # warm-up
                prefill, speed, cache = decode(model, prompt, new_tokens)
            print(
                f"| {name} | {kernel} | {prefill:.2f} | {speed:.1f} | {cache / 2**20:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    with one_line_errors():
        main()
