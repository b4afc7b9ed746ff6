"""Fixtures shared by the tokenizer and data tests (a small offline BPE tokenizer), a way to
run scripts side by side, and one torch thread for each of pytest-xdist's processes."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from llm.tokenizer import Tokenizer, load_tokenizer

# pytest-xdist runs the suite in two processes (pyproject's addopts): one core and one torch
# thread each, for them and the scripts they start, so that neither waits on the other's threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Merges on top of the 256 single bytes, each the concatenation of two earlier tokens. The
# whitespace merges matter: they make cutting text at the wrong place change the tokens.
TINY_MERGES = [b"\n\n", b"  ", b"\r\n", b"th", b"he", b"the", b" t", b" the", b"e ", b"in", b"ng"]


@pytest.fixture
def tiny_ranks_file(tmp_path: Path) -> Path:
    """A ranks file in tiktoken's format: 256 byte tokens, then TINY_MERGES."""
    tokens = [bytes([b]) for b in range(256)] + TINY_MERGES
    path = tmp_path / "tiny.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    return path


@pytest.fixture
def tiny_tokenizer(tiny_ranks_file: Path) -> Tokenizer:
    return load_tokenizer("tiny", path=tiny_ranks_file)


Item = TypeVar("Item")
Result = TypeVar("Result")


def two_at_a_time(run: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
    """``run`` of each item, two at a time, in order: for script runs, which are mostly Python's
    imports, on one core each."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run, items))
