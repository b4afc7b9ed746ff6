"""Generation: greedy and sampled decoding, top-k/top-p, the KV cache against the no-cache path
(sliding past the context included), streaming text, and the generate script end to end."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint import write_training_checkpoint

from llm.generate import (
    TextStream,
    encode_prompt,
    generate,
    generate_text,
    generate_tokens,
    keep_top_k,
    keep_top_p,
    sample_next_token,
)
from llm.hardware import device_from_name
from llm.model import GPT, GPTConfig
from llm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 16
VOCAB_SIZE = 257  # bytes and the end-of-text token


def tiny_model(seed: int = 0, **overrides: object) -> GPT:
    """A random byte-level model with sharp next-token distributions: weights of std 0.3 instead
    of 0.02, so that greedy choices are never near-ties that rounding could flip."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB_SIZE, context_length=CONTEXT, n_layer=2, n_head=2, n_embd=16)
    model = GPT(GPTConfig(**(fields | overrides)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


def prompt(batch: int = 1, length: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Greedy and sampling --------------------------------------------------------------------


def test_greedy_is_deterministic_and_picks_the_most_likely_token():
    model, idx = tiny_model(), prompt()
    first = generate_tokens(model, idx, 8, temperature=0)
    assert torch.equal(first, generate_tokens(model, idx, 8, temperature=0))
    sequence = idx
    for _ in range(8):  # the textbook loop: full forward, argmax of the last position
        logits, _ = model(sequence)
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(first, sequence)


def test_same_seed_reproduces_sampling_and_another_seed_differs():
    model, idx = tiny_model(), prompt()
    sample = lambda seed: generate_tokens(model, idx, 12, temperature=1.5, generator=seeded(seed))
    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_temperature_sharpens_or_flattens_and_zero_is_greedy_whatever_else_is_set():
    logits = torch.tensor([[0.0, 1.0]]).expand(1000, 2)
    cold = sample_next_token(logits, temperature=0.01, generator=seeded())
    assert (cold == 1).all()  # e^100 to 1
    hot = sample_next_token(logits, temperature=100.0, generator=seeded())
    assert 400 < int((hot == 1).sum()) < 600  # e^0.01 to 1: close to a coin flip
    frozen = sample_next_token(logits * 1e6, temperature=1e-45, generator=seeded())
    assert (frozen == 1).all()  # divided, the logits would be inf, and their softmax NaN
    frozen = sample_next_token(logits, temperature=1e-46, generator=seeded())
    assert (frozen == 1).all()  # 0 in float32: the logits would be 0 / 0
    model, idx = tiny_model(), prompt(batch=2)
    greedy = generate_tokens(model, idx, 10, temperature=0)
    assert torch.equal(generate_tokens(model, idx, 10, temperature=0, top_k=5, top_p=0.5), greedy)


@pytest.mark.parametrize("eot_token", [None, 256])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("first_position", [0, 8])
def test_logits_that_overflow_are_refused_not_sampled(first_position, temperature, eot_token):
    model, idx = tiny_model(), prompt()  # 5 tokens: position 8 is fed in at the fifth step
    with torch.no_grad():  # fits float32, overflows float16: at once, or only later
        model.position_embedding.weight[first_position:].mul_(1e8)
    options = dict(temperature=temperature, eot_token=eot_token, generator=seeded())
    generate_tokens(model, idx, 6, **options)
    fed = []
    model.half().register_forward_pre_hook(lambda module, args: fed.append(args[0].size(1)))
    with pytest.raises(ValueError, match=r"not all finite \(inf or NaN\) in torch.float16: its"):
        list(generate(model, idx, 6, **options))
    # With end-of-text, generation waits for the device at every token anyway: it stops there.
    assert len(fed) == (6 if eot_token is None else max(1, first_position - 3))


def test_top_k_1_equals_greedy():
    model, idx = tiny_model(), prompt(batch=2)
    greedy = generate_tokens(model, idx, 10, temperature=0)
    top1 = generate_tokens(model, idx, 10, temperature=2.0, top_k=1, generator=seeded())
    assert torch.equal(top1, greedy)


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = keep_top_k(logits, 3)
    assert torch.isfinite(kept).tolist() == [[False, True, True, True, False]]
    assert torch.equal(keep_top_k(logits, 99), logits)  # k above the vocabulary keeps all


@pytest.mark.parametrize(
    ("p", "kept"),
    [
        (0.4, {0}),  # the most likely token alone already reaches p
        (0.5, {0}),  # exactly reaches it
        (0.6, {0, 1}),
        (0.75, {0, 1}),
        (0.8, {0, 1, 2}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_smallest_set_whose_probability_reaches_p(p, kept):
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])  # exact in binary: no rounding at the edges
    order = torch.tensor([2, 0, 3, 1])  # shuffle the vocabulary: sorting is keep_top_p's job
    logits = probs.log()[order][None]  # token order[i] sits at vocabulary position i
    survivors = torch.isfinite(keep_top_p(logits, p))[0]
    assert {int(order[i]) for i in range(4) if survivors[i]} == kept


def test_top_p_sampling_draws_only_from_the_nucleus():
    logits = torch.tensor([0.6, 0.3, 0.05, 0.05]).log().repeat(500, 1)  # 500 draws at once
    draws = sample_next_token(logits, top_p=0.85, generator=seeded())
    assert set(draws.tolist()) == {0, 1}


# --- KV cache and sliding window ------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0},
        {"temperature": 1.0, "generator_seed": 3},
        {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "generator_seed": 4},
    ],
)
def test_kv_cache_path_produces_exactly_the_no_cache_tokens(options):
    """40 new tokens from a 5-token prompt with a 16-token context: the window slides 4 times."""
    model, idx = tiny_model(), prompt(batch=2)
    seed = options.pop("generator_seed", 0)
    runs = [
        generate_tokens(model, idx, 40, use_cache=cache, generator=seeded(seed), **options)
        for cache in (True, False)
    ]
    assert runs[0].shape == (2, 45)
    assert torch.equal(runs[0], runs[1])


def test_sliding_window_rebuilds_the_cache_from_the_last_tokens_at_bounded_cost():
    model, idx = tiny_model(), prompt(length=5)
    fed: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(args[0]), with_kwargs=True
    )
    try:
        sequence = generate_tokens(model, idx, 60, temperature=0)
    finally:
        hook.remove()
    keep = CONTEXT // 2
    # New token i is computed from the 5 + i tokens before it; past the context the window
    # drops to `keep` tokens and refills by one a step: a rebuild every CONTEXT - keep + 1.
    rebuilds = [i for i, tokens in enumerate(fed) if tokens.size(1) > 1][1:]  # after the prompt
    assert rebuilds == list(range(CONTEXT + 1 - 5, 60, CONTEXT - keep + 1))
    for call in rebuilds:
        # Call i computes the logits of new token i from the last `keep` tokens before it.
        assert torch.equal(fed[call], sequence[:, 5 + call - keep : 5 + call])
    assert all(tokens.size(1) <= CONTEXT for tokens in fed)
    assert sum(tokens.size(1) for tokens in fed) <= 5 + 2 * 60  # O(1) tokens per new token


def test_prompt_filling_the_whole_context_still_generates():
    model = tiny_model()
    idx = prompt(length=CONTEXT)
    cached = generate_tokens(model, idx, 5, temperature=0)
    assert torch.equal(cached, generate_tokens(model, idx, 5, temperature=0, use_cache=False))


# --- End of text, modes, errors -------------------------------------------------------------


def test_generation_stops_when_every_row_has_produced_the_end_of_text_token():
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 5), generator=seeded(19))  # rows that start differently
    greedy = generate_tokens(model, idx, 6, temperature=0)[:, 5:]  # (2, 6)
    eot = int(greedy[0, 0])  # the first row's first token ends it at once
    tokens = torch.stack(list(generate(model, idx, 6, temperature=0, eot_token=eot)), dim=1)
    row1_end = next((i for i, t in enumerate(greedy[1].tolist()) if t == eot), 5)
    assert row1_end > 0 and (greedy[0, 1:] != eot).any()  # else the test would prove nothing
    assert tokens.shape == (2, row1_end + 1)
    assert (tokens[0] == eot).all()  # a finished row yields end-of-text from then on
    assert torch.equal(tokens[1], greedy[1, : row1_end + 1])


def test_generate_runs_in_eval_mode_without_gradients_and_restores_the_mode():
    model, idx = tiny_model(dropout=0.5).train(), prompt()
    tokens = torch.stack(list(generate(model, idx, 4, temperature=0)), dim=1)
    assert model.training
    assert not tokens.requires_grad
    assert torch.equal(tokens, generate_tokens(model.eval(), idx, 4, temperature=0)[:, 5:])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -1}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": "0.7"}, "temperature must be a finite number >= 0"),
        ({"top_k": 0}, "top_k must be a whole number >= 1"),
        ({"top_k": 2.5}, "top_k must be a whole number >= 1"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": True}, r"top_p must be a number in \(0, 1\]"),
        ({"max_new_tokens": -1}, "max_new_tokens must be a whole number >= 0"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number >= 0"),
        ({"eot_token": VOCAB_SIZE}, rf"eot_token must be a token id in \[0, {VOCAB_SIZE}\)"),
        ({"eot_token": -1}, r"eot_token must be a token id"),
    ],
)
def test_bad_sampling_options_fail_at_the_call(options, message):
    arguments = {"max_new_tokens": 3} | options
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), prompt(), **arguments)  # no iteration needed


def test_float_ids_fail_at_the_call_and_sampling_checks_its_settings():
    with pytest.raises(ValueError, match=r"Token ids must be torch\.long .*, got torch\.float32"):
        generate(tiny_model(), prompt().float(), 3)
    logits = torch.randn(2, VOCAB_SIZE)
    for options in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}):
        with pytest.raises(ValueError, match="must be"):
            sample_next_token(logits, **options)


def test_empty_and_too_long_prompts_are_refused():
    tokenizer = load_tokenizer("bytes")
    with pytest.raises(ValueError, match="the prompt is empty"):
        encode_prompt(tokenizer, "", CONTEXT)
    with pytest.raises(ValueError, match=r"The prompt of 17 tokens is longer than .* \(16\)"):
        encode_prompt(tokenizer, "x" * 17, CONTEXT)
    with pytest.raises(
        ValueError, match=r"The prompt of 17 tokens .* crop it to its last 16 tokens"
    ):
        generate(tiny_model(), prompt(length=CONTEXT + 1), 1)
    with pytest.raises(ValueError, match="max_tokens must be a whole number >= 1"):
        encode_prompt(tokenizer, "xyz", CONTEXT, max_tokens=-1)


# --- Text and streaming ---------------------------------------------------------------------


def test_text_stream_holds_back_split_characters_and_joins_to_the_decoded_text():
    tokenizer = load_tokenizer("bytes")  # one token per byte: every non-ASCII character splits
    text = "héllo wörld, 世界 🙂!"
    pieces = list(TextStream(tokenizer, tokenizer.encode(text)))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)  # never half a character
    assert "世" in pieces and "🙂" in pieces


def test_text_stream_replaces_invalid_bytes_like_the_tokenizer_and_stops_at_end_of_text():
    tokenizer = load_tokenizer("bytes")
    ids = [0xE4, 0xB8, 65, 0xFF, 0xF0, 0x9F]  # cut character, invalid byte, unfinished emoji
    assert "".join(TextStream(tokenizer, ids)) == tokenizer.decode(ids)
    stream = TextStream(tokenizer, [72, 105, tokenizer.eot_token, 33])
    assert "".join(stream) == "Hi"
    assert stream.num_tokens == 2
    with pytest.raises(ValueError, match="300 is no token id of the bytes tokenizer"):
        list(TextStream(tokenizer, [72, 300]))
    batch = [torch.tensor([72]), torch.tensor([105, 33])]  # tokens of two sequences at once
    with pytest.raises(ValueError, match=r"decodes one sequence, got \(2,\) tokens at once"):
        list(TextStream(tokenizer, batch))


def test_generate_text_stops_at_the_end_of_text_token_it_is_given():
    model, tokenizer = tiny_model(), load_tokenizer("bytes")
    idx = encode_prompt(tokenizer, "Hello", CONTEXT)
    new_tokens = generate_tokens(model, idx, 30, temperature=0)[0, idx.size(1) :].tolist()
    stop = new_tokens[3]  # the fourth token generated greedily becomes the end-of-text token
    text = generate_text(model, tokenizer, "Hello", 30, temperature=0, eot_token=stop)
    assert text == tokenizer.decode(new_tokens[: new_tokens.index(stop)])


def test_streaming_prints_the_same_text_as_the_non_streaming_path():
    model, tokenizer = tiny_model(), load_tokenizer("bytes")
    options = {"temperature": 1.0, "top_k": 50}
    text = generate_text(model, tokenizer, "Héllo", 40, generator=seeded(5), **options)
    idx = encode_prompt(tokenizer, "Héllo", CONTEXT)
    tokens = generate(model, idx, 40, eot_token=tokenizer.eot_token, generator=seeded(5), **options)
    assert "".join(TextStream(tokenizer, tokens)) == text
    assert len(text) > 0


# --- The script -----------------------------------------------------------------------------


def run_script(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


@pytest.mark.slow
def test_generate_script_streams_the_generated_text_and_writes_no_files(tmp_path):
    model = tiny_model()
    write_training_checkpoint(model, tmp_path / "model.ckpt")
    result = run_script(
        "checkpoint=model.ckpt",
        "prompt=Hello",
        "max_new_tokens=30",
        "temperature=0",
        "dtype=float32",  # the reference below runs in float32
        "show_speed=true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    expected = generate_text(model, load_tokenizer("bytes"), "Hello", 30, temperature=0)
    assert result.stdout == f"Hello{expected}\n"
    # The first token (the prompt's forward pass, the warm-up) is timed apart from the rest, on
    # the device that device=auto picks.
    device = device_from_name("auto").type
    speed = rf"30 tokens in [\d.]+ s: the first after [\d.]+ s, then [\d.]+ tokens/s \({device}, "
    last_line = result.stderr.splitlines()[-1]
    assert re.fullmatch(speed + r"torch.float32, cache on\)", last_line), result.stderr
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt"]  # no outputs/ or .hydra/
