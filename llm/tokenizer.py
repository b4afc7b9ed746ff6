"""Tokenizers: text to token ids and back, as a thin layer over tiktoken.

Three ways to get one, all through ``load_tokenizer``:

- by name, any tiktoken encoding (``gpt2``, ``r50k_base``, ``cl100k_base``, ``o200k_base``,
  ...), downloaded by tiktoken on first use and cached (``TIKTOKEN_CACHE_DIR`` is honoured);
- from a local ranks file in tiktoken's format (``base64(token) rank`` per line), read with
  GPT-2's split pattern and ``<|endoftext|>`` as the id after the last rank, so that an offline
  machine can use GPT-2 from a copy of ``gpt2.tiktoken`` (or a BPE of its own, named as the
  user likes; not the tiktoken encodings that split text otherwise, such as ``cl100k_base``);
- ``bytes``: 256 byte tokens plus ``<|endoftext|>``, built in code, needing no download.

Training exposes the first two as the config keys ``tokenizer.name`` and ``tokenizer.path``;
other scripts as flags, which ``TokenizerOptions`` names in the fixes that errors suggest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenizer: the regex that cuts text into words, numbers, punctuation runs and
# whitespace before byte-pair merging. tiktoken's gpt2 and r50k_base encodings use it.
GPT2_SPLIT_PATTERN = r50k_pat_str
# The tiktoken encodings a ranks file read the GPT-2 way reproduces: GPT-2's split pattern and
# <|endoftext|> after the last rank. The others (p50k_base, cl100k_base, o200k_base, ...) split
# text differently or number their special tokens elsewhere.
GPT2_STYLE_ENCODINGS = ("gpt2", "r50k_base")


class TokenizerError(ValueError):
    """A tokenizer could not be loaded; the message says what to use instead."""


class Tokenizer:
    """Encodes text to token ids and decodes them back.

    ``encode`` is tiktoken's ordinary encoding: text that looks like a special token, such as
    ``<|endoftext|>`` typed into a document, is encoded as plain text. The only way to get
    ``eot_token`` into a token stream is to append it explicitly, which is what data
    preparation does between documents.
    """

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.name: str = encoding.name
        self.vocab_size: int = encoding.n_vocab
        self.eot_token: int = encoding.eot_token

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    @cached_property
    def fingerprint(self) -> str:
        """The SHA-256 of every token id's bytes, in id order: tokenizers of one name and size
        but other ranks (another ranks file) differ in it, and encode text otherwise."""
        digest = hashlib.sha256()
        for token in range(self.vocab_size):
            try:
                piece = self.encoding.decode_single_token_bytes(token)
            except KeyError:  # an id no token has (some encodings skip ids before the special)
                piece = b""
            digest.update(len(piece).to_bytes(4, "little") + piece)
        return digest.hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a uint32 numpy array, the same ids as ``encode``.

        Data preparation uses this: tiktoken fills the array directly, skipping the Python list
        of ints, which costs as much as a fifth of the encoding time on large corpora.
        """
        # With nothing allowed and nothing disallowed, special-token text is plain text, which
        # is exactly the ordinary encoding.
        encode = partial(
            self.encoding.encode_to_numpy, allowed_special=set(), disallowed_special=()
        )
        try:
            return encode(text)
        except UnicodeEncodeError:
            # A lone surrogate, which UTF-8 cannot hold: U+FFFD in its place, as ``encode`` does.
            return encode(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of token ids (a list, numpy array or tensor); invalid UTF-8 becomes U+FFFD."""
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        try:
            return self.encoding.decode(ids)
        except (KeyError, OverflowError, TypeError):
            raise self._not_tokens(ids) from None

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token id (a token can end inside a UTF-8 character)."""
        try:
            return self.encoding.decode_single_token_bytes(token)
        except (KeyError, OverflowError, TypeError):
            raise self._not_tokens([token]) from None

    def _not_tokens(self, ids: Sequence[int]) -> ValueError:
        """The error for ids that name no token of this tokenizer."""
        bad = next((i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size), ids)
        return ValueError(
            f"{bad!r} is no token id of the {self.name} tokenizer (0 to {self.vocab_size - 1}); "
            "were the ids made by another tokenizer?"
        )


@dataclass(frozen=True)
class TokenizerOptions:
    """How a script's user sets the tokenizer's name and ranks file, for the fixes that error
    messages suggest: training's config keys by default. ``name`` is None where the name is
    not the user's to choose (a model names its own tokenizer)."""

    name: str | None = "tokenizer.name"
    path: str = "tokenizer.path"

    def setting(self, option: str, value: str) -> str:
        """``option`` set to ``value`` as the user writes it: a config key as
        ``tokenizer.path=x``, a command-line flag as ``--tokenizer-path x``."""
        return f"{option} {value}" if option.startswith("-") else f"{option}={value}"

    def or_bytes(self) -> str:
        """The no-download alternative, where the user chooses the name."""
        return f" (or use {self.setting(self.name, 'bytes')})" if self.name else ""


# Training's settings: the config keys tokenizer.name and tokenizer.path.
CONFIG_KEYS = TokenizerOptions()
# The settings of a script that loads a model: the model names its tokenizer, and the user may
# give its ranks file (generate.py's tokenizer.path).
MODEL_NAMED = TokenizerOptions(name=None)


def load_tokenizer(
    name: str = "gpt2", path: str | Path | None = None, options: TokenizerOptions = CONFIG_KEYS
) -> Tokenizer:
    """The tokenizer called ``name``, or the one stored in the ranks file at ``path``.

    With ``path`` the file is read with GPT-2's split pattern and ``<|endoftext|>`` as the id
    after the last rank, and ``name`` labels it (``gpt2`` by default, so a local copy of GPT-2's
    ranks prepares data that matches data prepared with the downloaded ``gpt2``). ``options``
    names the settings that errors suggest.
    """
    check_tokenizer_spec(name, path, options)
    if path is not None:
        return Tokenizer(_encoding_from_ranks_file(Path(path), name, options))
    if name == "bytes":
        return Tokenizer(_bytes_encoding())
    try:
        return Tokenizer(tiktoken.get_encoding(name))
    except Exception as err:  # tiktoken raises whatever its HTTP client or cache raises
        raise TokenizerError(
            f"could not download the {name!r} tokenizer ({type(err).__name__}: {err}); "
            f"offline, {_offline_choice(name, options)}"
        ) from None


def check_tokenizer_spec(
    name: str, path: str | Path | None = None, options: TokenizerOptions = CONFIG_KEYS
) -> None:
    """Raise a one-line TokenizerError for a ``name`` and ``path`` that ``load_tokenizer`` would
    refuse before reading any file or downloading anything; ``options`` as there."""
    if path is not None:
        if name == "bytes":  # the file would be read, and labelled "bytes"
            name_it = options.name and options.setting(options.name, "gpt2")
            raise TokenizerError(
                f"the bytes tokenizer has no ranks file: drop {options.path}"
                + (f", or name the encoding the file holds ({name_it})" if name_it else "")
            )
        if name in tiktoken.list_encoding_names() and name not in GPT2_STYLE_ENCODINGS:
            own_bpe = options.name and options.setting(options.name, "my_bpe")
            raise TokenizerError(
                f"a ranks file is read as GPT-2 reads its own (its split pattern, "
                f"<|endoftext|> after the last rank), which would not encode like {name!r}: "
                f"drop {options.path} and {_offline_choice(name, options)}"
                + (f" (a BPE of your own: give it a name of its own, {own_bpe})" if own_bpe else "")
            )
    elif name != "bytes" and name not in tiktoken.list_encoding_names():
        ranks_file = options.setting(options.path, "/path/to/file.tiktoken")
        if options.name is None:  # a model named it: only its ranks file can stand in
            raise TokenizerError(
                f"the model's tokenizer {name!r} is not one tiktoken knows: give its ranks "
                f"file, {ranks_file}"
            )
        known = ", ".join(["bytes", *tiktoken.list_encoding_names()])
        raise TokenizerError(
            f"unknown tokenizer {name!r}: use one of {known}, or a local ranks file with "
            f"{ranks_file}"
        )


def _offline_choice(name: str, options: TokenizerOptions) -> str:
    """What to use instead of downloading the tiktoken encoding ``name``."""
    if name in GPT2_STYLE_ENCODINGS:
        ranks_file = options.setting(options.path, f"/path/to/{name}.tiktoken")
        return f"give a local ranks file, {ranks_file}{options.or_bytes()}"
    # Only tiktoken's own download cache holds such an encoding whole.
    from_cache = (
        f"set TIKTOKEN_CACHE_DIR to a copy of the cache of a machine that downloaded {name!r}"
    )
    if options.name is None:  # a model named it: nothing else can stand in
        return from_cache
    gpt2 = options.setting(options.name, "gpt2")
    return f"{from_cache}, or use {gpt2} with {options.setting(options.path, 'gpt2.tiktoken')}"


def _bytes_encoding() -> tiktoken.Encoding:
    """Byte-level encoding: token i is byte i, and ``<|endoftext|>`` is 256."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={ENDOFTEXT: 256},
    )


def _encoding_from_ranks_file(
    path: Path, name: str, options: TokenizerOptions
) -> tiktoken.Encoding:
    """A GPT-2-style encoding from a tiktoken ranks file: one ``base64(token) rank`` a line."""
    # Read the file here rather than with tiktoken.load.load_tiktoken_bpe, which also copies
    # local files into its download cache.
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} not found, or a folder: give {options.path} a tiktoken "
            f"ranks file such as gpt2.tiktoken{options.or_bytes()}"
        )
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(
                f"{path} line {number} is not '<base64 token> <rank>': "
                f"{options.path} must be a ranks file in tiktoken's format"
            ) from None
    # Byte-pair encoding needs every single byte as a token (or some text has no encoding) and
    # ranks 0 .. n-1 (so that <|endoftext|> = n is the next free id).
    if any(bytes([b]) not in ranks for b in range(256)) or sorted(ranks.values()) != list(
        range(len(ranks))
    ):
        raise TokenizerError(
            f"{path} is not a complete ranks file (all 256 single bytes, ranks 0 .. n-1 once "
            f"each): {options.path} must be a ranks file in tiktoken's format"
        )
    return tiktoken.Encoding(
        name=name,
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: len(ranks)},
    )
