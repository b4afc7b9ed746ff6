"""Generate text: python scripts/generate.py checkpoint=PATH prompt="Once upon a time" [key=val]

The checkpoint is a training checkpoint (.ckpt), a .safetensors model saved by llm, or a Hugging
Face GPT-2 folder; the prompt comes from ``prompt=``, ``prompt_file=`` or stdin. Hydra needs
quotes around text with punctuation or non-ASCII characters: 'prompt="Héllo, world"'. Text
streams to stdout as it is generated. Options and defaults: configs/generate.yaml.
"""

import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from llm.checkpoint import load_model_and_tokenizer
from llm.checks import (
    BOOLEAN,
    INTEGER,
    NUMBER,
    OPTIONAL_INTEGER,
    OPTIONAL_NUMBER,
    Check,
    check_known_keys,
    check_values,
    non_negative,
    positive,
)
from llm.errors import one_line_errors, quoting_fix, run_hydra_main
from llm.generate import TextStream, encode_prompt, generate
from llm.hardware import device_from_name, has_fast_bf16

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "generate.yaml"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CHECKS: list[Check] = [
    ("num_samples", INTEGER, positive, "a positive integer"),
    ("max_new_tokens", INTEGER, positive, "a positive integer"),
    ("temperature", NUMBER, non_negative, "a non-negative number (0 is greedy)"),
    ("top_k", OPTIONAL_INTEGER, lambda v: v is None or v >= 1, "a positive integer or null"),
    ("top_p", OPTIONAL_NUMBER, lambda v: v is None or 0 < v <= 1, "a number in (0, 1] or null"),
    ("seed", INTEGER, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
    ("tokenizer.path", (str, type(None)), lambda v: True, "a file path or null"),
    ("use_cache", BOOLEAN, lambda v: True, "true or false"),
    ("show_speed", BOOLEAN, lambda v: True, "true or false"),
    ("device", (str,), lambda v: True, "auto, cpu, cuda or cuda:N"),
    ("dtype", (str,), lambda v: v == "auto" or v in DTYPES, "auto, " + ", ".join(DTYPES)),
]


def read_prompt(cfg: DictConfig) -> str:
    """The prompt from ``prompt``, ``prompt_file`` ("-" for stdin), or piped stdin."""
    if cfg.prompt is not None and cfg.prompt_file is not None:
        raise ValueError("give prompt or prompt_file, not both")
    if cfg.prompt is not None:
        if not isinstance(cfg.prompt, str):  # Hydra reads true, 12 or 1e3 as values, not text
            raise ValueError(
                f"prompt was read as {cfg.prompt!r} ({type(cfg.prompt).__name__}), not text: "
                + quoting_fix("prompt")
            )
        return cfg.prompt
    stdin_open = sys.stdin is not None  # None when the shell closed it (<&-)
    if cfg.prompt_file == "-" or (
        cfg.prompt_file is None and stdin_open and not sys.stdin.isatty()
    ):
        if not stdin_open:
            raise ValueError("prompt_file=- reads stdin, but stdin is closed; give prompt=...")
        return decoded(sys.stdin.buffer.read(), "stdin")
    if cfg.prompt_file is None:
        raise ValueError('no prompt: give prompt="...", prompt_file=PATH, or pipe text to stdin')
    path = Path(str(cfg.prompt_file))
    if not path.exists() or path.is_dir():  # a pipe (prompt_file=<(...)) is read as a file
        raise FileNotFoundError(f"prompt_file {path} not found, or a folder")
    return decoded(path.read_bytes(), f"prompt_file {path}")


def decoded(text: bytes, source: str) -> str:
    try:
        return text.decode()
    except UnicodeDecodeError as err:
        raise ValueError(f"{source} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def run(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "checkpoint") or cfg.checkpoint is None:
        raise ValueError("no model: give checkpoint=PATH (a .ckpt, .safetensors or GPT-2 folder)")
    # configs/generate.yaml holds every setting; one added with +key=value is a typo.
    settings = OmegaConf.load(CONFIG)
    check_known_keys(cfg, set(settings) - {"defaults"})
    check_known_keys(cfg.tokenizer, set(settings.tokenizer), "tokenizer.")
    check_values(cfg, CHECKS)
    device = device_from_name(cfg.device)
    prompt = read_prompt(cfg)
    model, tokenizer = load_model_and_tokenizer(str(cfg.checkpoint), device, cfg.tokenizer.path)
    # Decoding reads every weight once per token: bf16 weights halve that where bf16 is fast.
    auto_dtype = "bfloat16" if has_fast_bf16(device.type) else "float32"
    model.to(DTYPES[auto_dtype if cfg.dtype == "auto" else cfg.dtype])
    idx = encode_prompt(tokenizer, prompt, model.config.context_length, device)
    generator = torch.Generator(device).manual_seed(cfg.seed)

    # The first token waits for the prompt's forward pass and the device's warm-up (CUDA loads
    # its libraries on first use): timed apart, so that the rate after it is decoding's.
    num_tokens, start, first = 0, time.perf_counter(), None
    for sample in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {sample + 1} ---")
        tokens = generate(
            model,
            idx,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            eot_token=tokenizer.eot_token,
            use_cache=cfg.use_cache,
            generator=generator,
        )
        stream = TextStream(tokenizer, tokens)
        print(prompt, end="", flush=True)
        try:
            for piece in stream:
                if first is None:  # (tokens of every sample so far, when)
                    first = (num_tokens + stream.num_tokens, time.perf_counter())
                print(piece, end="", flush=True)
        finally:
            print(flush=True)  # the line ends, also where an error cuts the text short
        num_tokens += stream.num_tokens
    if cfg.show_speed:
        end = time.perf_counter()
        speed = f"{num_tokens} tokens in {end - start:.2f} s"
        if first is not None and num_tokens > first[0]:
            first_tokens, first_at = first
            rate = (num_tokens - first_tokens) / (end - first_at)
            speed += f": the first after {first_at - start:.2f} s, then {rate:.1f} tokens/s"
        print(
            f"{speed} ({device}, {model.token_embedding.weight.dtype}, "
            f"cache {'on' if cfg.use_cache else 'off'})",
            file=sys.stderr,
        )


@hydra.main(config_path="../configs", config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        run(cfg)


if __name__ == "__main__":
    run_hydra_main(main, sweeps=False)  # generation writes no files
