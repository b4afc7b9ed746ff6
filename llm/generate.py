"""Text generation: sampling one token at a time, with the attention KV cache.

``generate`` yields each new token as soon as it is produced and ``generate_tokens`` collects
the whole sequence; ``TextStream`` decodes tokens to text as they arrive and ``generate_text``
continues a text prompt in one call.

The cache makes each new token cost one token's forward pass, however long the text grows. The
model's positions are learned (or, with RoPE, computed only up to ``context_length``), so a text
longer than ``context_length`` cannot simply drop its oldest cached position: every kept token
would move to a new position. When the window is full it therefore slides: the model keeps the
last ``context_length // 2`` tokens and rebuilds the cache from them in one forward pass. That
rebuild happens about once every ``context_length / 2`` tokens, so its cost per token stays
bounded. The no-cache path (``use_cache=False``) slides the same window and only recomputes it
at every step, so both paths see the same tokens and produce the same text. Shapes: B batch,
T tokens, V vocabulary.
"""

from __future__ import annotations

import codecs
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from llm.attention import KVCache
from llm.model import GPT, check_token_id, check_token_ids
from llm.tokenizer import Tokenizer
from llm.values import is_number, is_whole_number


def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_token: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield ``max_new_tokens`` new tokens (B,) continuing the token ids ``idx`` (B, T).

    - ``temperature`` divides the logits; 0 means greedy (always the most likely token, so
      ``top_k`` and ``top_p`` do not matter).
    - ``top_k`` samples among the k most likely tokens only; ``top_k=1`` is greedy.
    - ``top_p`` samples among the smallest set of most likely tokens whose probability
      reaches p (nucleus sampling).
    - ``eot_token``: a row that produces it is finished and yields it from then on; generation
      stops early once every row has produced it.
    - ``use_cache=False`` recomputes the whole window at every step, the slow reference path.
    - ``generator`` makes sampling reproducible: the same seed gives the same tokens.

    Past ``context_length`` tokens the window slides, as the module docstring describes.

    The model runs in eval mode (no dropout) and without gradients while the tokens are
    generated, and returns to its previous mode afterwards. Arguments are checked at the call,
    but for the ids' values, which the model checks at the first step.
    """
    if not is_whole_number(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    check_token_id(eot_token, model.config.vocab_size, "eot_token")
    check_token_ids(idx, model.config.context_length, what="The prompt")
    # Checked once above, not again for every token.
    sample = functools.partial(
        _sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )
    return _generate(model, idx, max_new_tokens, sample, eot_token, use_cache)


def _generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    sample: Callable[[Tensor], Tensor],
    eot_token: int | None,
    use_cache: bool,
) -> Iterator[Tensor]:
    context_length = model.config.context_length
    window = idx  # (B, W): the last W tokens of the text, the ones the model conditions on
    caches: list[KVCache] | None = None  # hold the keys and values of window[:, :-1]
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,)
    # Whether any step's logits held inf or NaN, kept on the device: read where generation
    # waits for the device anyway (a stop at end-of-text, the end), not at every token.
    nonfinite = torch.zeros((), dtype=torch.bool, device=idx.device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if window.size(1) > context_length:
                window = window[:, -max(1, context_length // 2) :]  # slide: crop and rebuild
                caches = None
            with torch.no_grad():  # not around the yield: the caller keeps its own grad mode
                if not use_cache:
                    logits, _ = model(window)  # (B, W, V)
                elif caches is None:
                    caches = model.new_kv_caches()
                    logits, _ = model(window, kv_caches=caches)  # prefill the window at once
                else:
                    logits, _ = model(window[:, -1:], kv_caches=caches)  # the newest token
            nonfinite |= ~torch.isfinite(logits[:, -1]).all()
            next_token = sample(logits[:, -1])  # (B,)
            done = False
            if eot_token is not None:
                next_token = next_token.masked_fill(finished, eot_token)  # finished rows stay
                finished |= next_token == eot_token
                # The one wait for the device a token, which only a stop at end-of-text needs;
                # before the token goes out, so that no token of broken logits does.
                done, broken = torch.stack([finished.all(), nonfinite]).tolist()
                if broken:
                    raise nonfinite_logits_error(logits.dtype)
            yield next_token
            if done:
                return
            window = torch.cat([window, next_token[:, None]], dim=1)
        if eot_token is None and nonfinite:  # without end-of-text: read once, at the end
            raise nonfinite_logits_error(logits.dtype)
    finally:
        model.train(was_training)


def generate_tokens(model: GPT, idx: Tensor, max_new_tokens: int, **options: Any) -> Tensor:
    """``idx`` (B, T) followed by the new tokens (B, N), N <= ``max_new_tokens``; ``options``
    are ``generate``'s keyword arguments."""
    new_tokens = list(generate(model, idx, max_new_tokens, **options))
    if not new_tokens:
        return idx
    return torch.cat([idx, torch.stack(new_tokens, dim=1)], dim=1)


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id (B,) drawn from next-token logits (B, V), as ``generate`` describes."""
    check_sampling(temperature, top_k, top_p)
    check_finite_logits(logits)
    return _sample(logits, temperature, top_k, top_p, generator)


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """``sample_next_token`` with settings already checked."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Sample in float32 even for a bf16 model: low-precision probabilities round small ones to 0.
    # Less the row's largest first: divided by a tiny temperature, the logits would overflow to
    # inf (and softmax give NaN); so, at most 0, they only fall to -inf. A temperature below
    # float32's smallest number would round to 0 there (0 / 0): the smallest is as greedy.
    # NaN and inf made finite, so that sampling never fails on the device (CUDA's multinomial
    # would assert): generate reports such logits itself.
    logits = torch.nan_to_num(logits.float())
    temperature = max(temperature, torch.finfo(torch.float32).smallest_normal)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        logits = keep_top_k(logits, top_k)
    if top_p is not None:
        logits = keep_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_finite_logits(logits: Tensor) -> None:
    """Raise a one-line ValueError for logits with inf or NaN in them: from a model whose weights
    overflow in its dtype (float16, say) or are broken, argmax would pick garbage silently and
    multinomial fail deep inside torch. (It waits for the device.)"""
    if not torch.isfinite(logits).all():
        raise nonfinite_logits_error(logits.dtype)


def nonfinite_logits_error(dtype: torch.dtype) -> ValueError:
    return ValueError(
        f"the model's next-token logits are not all finite (inf or NaN) in {dtype}: its weights "
        "overflow in that dtype (run it in float32) or are broken"
    )


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    """Logits (B, V) with all but the ``k`` largest of each row set to -inf."""
    kth_largest = logits.topk(min(k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def keep_top_p(logits: Tensor, p: float) -> Tensor:
    """Logits (B, V) keeping, in each row, the smallest set of most likely tokens whose total
    probability reaches ``p``; the others become -inf."""
    sorted_probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    # A token is needed while the more likely tokens before it have not yet reached p; the
    # most likely token is always kept.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V), in sorted order
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


class TextStream:
    """Text pieces of one sequence's token stream, decoded as the tokens arrive.

    Iterating yields the text each token completes and stops at the end-of-text token. A token
    can end in the middle of a multi-byte UTF-8 character (an emoji or a CJK character is often
    split over two or three byte-level tokens): such bytes are held back until the character is
    complete, so the pieces join to exactly the tokenizer's decoding of the whole sequence,
    U+FFFD replacements for invalid bytes included. ``num_tokens`` counts the tokens decoded.
    """

    def __init__(self, tokenizer: Tokenizer, tokens: Iterable[Tensor | int]) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokens  # ints, or (1,) tensors as ``generate`` yields for one prompt
        self.num_tokens = 0

    def __iter__(self) -> Iterator[str]:
        token_bytes = self.tokenizer.token_bytes
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for tokens in self.tokens:
            if isinstance(tokens, Tensor) and tokens.numel() != 1:  # a batch's (B,) tokens
                raise ValueError(
                    f"TextStream decodes one sequence, got {tuple(tokens.shape)} tokens at once: "
                    "generate from one prompt, (1, T), or stream one row's tokens"
                )
            token = int(tokens)
            if token == self.tokenizer.eot_token:
                break
            self.num_tokens += 1
            if piece := utf8.decode(token_bytes(token)):
                yield piece
        if rest := utf8.decode(b"", final=True):  # bytes of an unfinished character
            yield rest


def encode_prompt(
    tokenizer: Tokenizer,
    prompt: str,
    context_length: int,
    device: torch.device | str = "cpu",
    max_tokens: int | None = None,
) -> Tensor:
    """The prompt's token ids (1, T), checked to be non-empty and to fit the context; with
    ``max_tokens``, only its first ``max_tokens`` tokens."""
    if max_tokens is not None and (not is_whole_number(max_tokens) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a whole number >= 1 or None, got {max_tokens!r}")
    ids = tokenizer.encode(prompt)[:max_tokens]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    if idx.numel() == 0:
        raise ValueError("the prompt is empty: give some text to continue")
    check_token_ids(idx, context_length, what="The prompt")
    return idx


def generate_text(
    model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, **options: Any
) -> str:
    """The continuation of ``prompt``, decoded at once, up to the end-of-text token (the
    tokenizer's, unless ``options`` name another ``eot_token``); ``options`` are ``generate``'s
    keyword arguments."""
    idx = encode_prompt(tokenizer, prompt, model.config.context_length, _device(model))
    eot = options.pop("eot_token", tokenizer.eot_token)
    new_tokens = generate_tokens(model, idx, max_new_tokens, eot_token=eot, **options)[0]
    new_tokens = new_tokens[idx.size(1) :].tolist()
    if eot in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(eot)]
    return tokenizer.decode(new_tokens)


def _device(model: GPT) -> torch.device:
    return model.token_embedding.weight.device


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a one-line ValueError for a sampling setting ``generate`` cannot use."""
    if not is_number(temperature) or not 0 <= temperature < math.inf:  # NaN too
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}"
        )
    if top_k is not None and (not is_whole_number(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1 or None (no limit), got {top_k!r}")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None (no limit), got {top_p!r}")
