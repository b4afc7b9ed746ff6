"""Tokenizer tests, offline: the built-in ``bytes`` encoding and a small ranks file."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from llm.tokenizer import (
    MODEL_NAMED,
    Tokenizer,
    TokenizerError,
    TokenizerOptions,
    load_tokenizer,
)

TEXT = "Hello, world!\n\nthe theory of everything  — naïve café 日本語 🙂\r\n"


def test_bytes_tokenizer_is_one_token_per_byte() -> None:
    tok = load_tokenizer("bytes")
    assert (tok.name, tok.vocab_size, tok.eot_token) == ("bytes", 257, 256)
    assert tok.encode("hé") == list("hé".encode())
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_special_token_text_is_plain_text() -> None:
    tok = load_tokenizer("bytes")
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot_token not in ids
    assert ids == list(b"a<|endoftext|>b")
    assert tok.encode_array("a<|endoftext|>b").tolist() == ids


def test_blank_lines_in_a_ranks_file_are_skipped(tiny_ranks_file: Path) -> None:
    with_blanks = tiny_ranks_file.with_name("blanks.tiktoken")
    with_blanks.write_bytes(b"\n" + tiny_ranks_file.read_bytes() + b"\n\n")
    tokenizer = load_tokenizer("tiny", path=with_blanks)
    assert tokenizer.vocab_size == load_tokenizer("tiny", path=tiny_ranks_file).vocab_size


def test_ranks_file_tokenizer(tiny_ranks_file: Path, tiny_tokenizer: Tokenizer) -> None:
    tok = tiny_tokenizer
    assert tok.name == "tiny"
    num_ranks = len(tiny_ranks_file.read_bytes().splitlines())
    assert tok.eot_token == num_ranks  # <|endoftext|> follows the last rank
    assert tok.vocab_size == num_ranks + 1
    assert len(tok.encode(" the")) == 1  # merged
    assert tok.decode(tok.encode(TEXT)) == TEXT
    # The default label is gpt2: a local copy of GPT-2's ranks stands in for the download.
    assert load_tokenizer(path=tiny_ranks_file).name == "gpt2"


def test_encode_variants_agree(tiny_tokenizer: Tokenizer) -> None:
    texts = [TEXT, "the thing\n\n", "", "a lone surrogate: \ud800"]
    ids = [tiny_tokenizer.encode(t) for t in texts]
    assert [tiny_tokenizer.encode_array(t).tolist() for t in texts] == ids


def test_decode_accepts_arrays_and_tensors(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode(TEXT)
    assert tiny_tokenizer.decode(np.array(ids, dtype=np.uint16)) == TEXT
    assert tiny_tokenizer.decode(torch.tensor(ids)) == TEXT


@pytest.mark.parametrize("bad_id", [-1, 257, 2.5])
def test_ids_that_name_no_token_are_refused_in_one_line(bad_id: object) -> None:
    tok = load_tokenizer("bytes")
    with pytest.raises(ValueError, match=rf"{bad_id} is no token id of the bytes tokenizer"):
        tok.decode([65, bad_id])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=rf"{bad_id} is no token id of the bytes tokenizer"):
        tok.token_bytes(bad_id)  # type: ignore[arg-type]


def test_missing_ranks_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer file .* not found"):
        load_tokenizer(path=tmp_path / "nope.tiktoken")


def test_the_bytes_tokenizer_takes_no_ranks_file(tiny_ranks_file: Path) -> None:
    with pytest.raises(TokenizerError, match="the bytes tokenizer has no ranks file"):
        load_tokenizer("bytes", path=tiny_ranks_file)


@pytest.mark.parametrize(
    "content",
    [
        b"not base64 at all\n",
        b"YQ== zero\n",  # a rank that is not a number
        b"YQ== 0\n",  # not every byte
        b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(255)),  # no 255
        b"@@@= 0\n",  # not base64, though it decodes leniently
    ],
)
def test_malformed_ranks_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="tiktoken's format"):
        load_tokenizer(path=path)


def test_errors_name_the_settings_of_the_script_in_use(tmp_path: Path) -> None:
    # prepare_data.py takes flags; where a model names its tokenizer, only the file is the
    # user's to give (generate.py, attention.py).
    flags = TokenizerOptions("--tokenizer", "--tokenizer-path")
    with pytest.raises(TokenizerError, match=r"with --tokenizer-path /path/to/file\.tiktoken$"):
        load_tokenizer("gpt7", options=flags)
    with pytest.raises(
        FileNotFoundError, match=r"such as gpt2.tiktoken \(or use --tokenizer bytes\)$"
    ):
        load_tokenizer(path=tmp_path / "nope.tiktoken", options=flags)
    model_named = TokenizerOptions(name=None, path="--tokenizer-path")
    with pytest.raises(
        FileNotFoundError,
        match=r"give --tokenizer-path a tiktoken ranks file such as gpt2\.tiktoken$",
    ):
        load_tokenizer(path=tmp_path / "nope.tiktoken", options=model_named)
    with pytest.raises(TokenizerError, match=r"no ranks file: drop --tokenizer-path$"):
        load_tokenizer("bytes", path=tmp_path / "nope.tiktoken", options=model_named)
    with pytest.raises(TokenizerError) as info:
        load_tokenizer("gpt7", options=MODEL_NAMED)
    assert str(info.value) == (
        "the model's tokenizer 'gpt7' is not one tiktoken knows: give its ranks file, "
        "tokenizer.path=/path/to/file.tiktoken"
    )


def test_unknown_name_lists_the_options() -> None:
    with pytest.raises(TokenizerError, match=r"unknown tokenizer 'gpt7'.*bytes.*gpt2"):
        load_tokenizer("gpt7")


def test_failed_download_names_the_offline_options(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> tiktoken.Encoding:
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError) as info:
        load_tokenizer("gpt2")
    message = str(info.value)
    assert "tokenizer.path=" in message and "tokenizer.name=bytes" in message
    assert "network is unreachable" in message and "\n" not in message
    # A ranks file read the GPT-2 way cannot stand in for an encoding that splits otherwise.
    with pytest.raises(TokenizerError) as info:
        load_tokenizer("cl100k_base")
    assert "TIKTOKEN_CACHE_DIR" in str(info.value)
    assert "cl100k_base.tiktoken" not in str(info.value)


@pytest.mark.parametrize("name", ["p50k_base", "cl100k_base", "o200k_base"])
def test_a_ranks_file_cannot_stand_in_for_an_encoding_that_splits_otherwise(
    tiny_ranks_file: Path, name: str
) -> None:
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(name, path=tiny_ranks_file)
    message = str(info.value)
    assert (
        f"would not encode like '{name}': drop tokenizer.path and set TIKTOKEN_CACHE_DIR" in message
    )
    assert "tokenizer.name=gpt2 with tokenizer.path=gpt2.tiktoken" in message
    assert message.endswith("name of its own, tokenizer.name=my_bpe)")
    with pytest.raises(TokenizerError) as info:  # a model names it: only the cache can help
        load_tokenizer(name, path=tiny_ranks_file, options=MODEL_NAMED)
    assert str(info.value).endswith(f"of a machine that downloaded '{name}'")
    assert load_tokenizer("r50k_base", path=tiny_ranks_file).name == "r50k_base"
