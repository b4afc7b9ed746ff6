"""Data pipeline tests, offline: preparation, token files, datasets and the DataModule.

Downloads go to a local HTTP server on 127.0.0.1; tokenizers are ``bytes`` or a small ranks
file built by the test (see conftest.py).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import logging
import os
import re
import runpy
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import llm.data as data
from llm.data import DataError, RemoteText, check_tokenizer, prepare, read_meta
from llm.datamodule import TokenDataModule, TrainWindows, ValWindows
from llm.files import made_folder
from llm.tokenizer import Tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Text that exercises the pre-tokenizer: blank lines, CRLF, runs of spaces, punctuation before
# newlines, contractions, digits and non-ASCII.
LINES = [
    "First Citizen:\n",
    "Before we proceed any further, hear me speak.\n\n",
    "All:\nSpeak, speak.\n",
    "  indented  line with   spaces\n",
    "It's 1,234 they'll pay; naïve café — 日本語 🙂\r\n",
    "the thing thereof\n\n\n",
]


def corpus(num_lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(LINES[i] for i in rng.integers(len(LINES), size=num_lines))


@pytest.fixture
def bytes_tok() -> Tokenizer:
    return load_tokenizer("bytes")


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "story.txt"
    path.parent.mkdir()
    path.write_text(corpus(400), newline="")
    return path


# --- Preparation -----------------------------------------------------------------------------


def read_tokens(dataset_dir: Path, split: str) -> np.ndarray:
    return np.fromfile(dataset_dir / f"{split}.bin", dtype=read_meta(dataset_dir)["dtype"])


def test_prepare_then_decode_reproduces_the_text(
    tmp_path: Path, text_file: Path, bytes_tok: Tokenizer
) -> None:
    out = prepare(str(text_file), bytes_tok, tmp_path / "data", val_fraction=0.25)
    assert out == tmp_path / "data" / "story"
    text = text_file.read_bytes().decode()
    split_at = int(len(text) * 0.75)  # a fraction of the characters, nanoGPT-style
    assert bytes_tok.decode(read_tokens(out, "train")) == text[:split_at]
    assert bytes_tok.decode(read_tokens(out, "val")) == text[split_at:]
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and meta["split"] == "characters"
    assert meta["inputs"]["sha256"] == [hashlib.sha256(text_file.read_bytes()).hexdigest()]
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == len(text.encode())


def test_chunked_encoding_equals_whole_text_encoding(
    tmp_path: Path, text_file: Path, tiny_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A naive cut after a blank line changes the tokens; that is why cuts are chosen.
    assert tiny_tokenizer.encode("a\n\n") + tiny_tokenizer.encode("b") != tiny_tokenizer.encode(
        "a\n\nb"
    )
    monkeypatch.setattr(data, "BLOCK_BYTES", 64)  # hundreds of pieces
    pieces = list(data.read_pieces(text_file))
    text = text_file.read_bytes().decode()
    assert len(pieces) > 100 and "".join(pieces) == text
    assert [t for p in pieces for t in tiny_tokenizer.encode(p)] == tiny_tokenizer.encode(text)

    out = prepare(str(text_file), tiny_tokenizer, tmp_path / "data", num_threads=3)
    split_at = int(len(text) * 0.9)
    assert read_tokens(out, "train").tolist() == tiny_tokenizer.encode(text[:split_at])
    assert read_tokens(out, "val").tolist() == tiny_tokenizer.encode(text[split_at:])


def test_text_without_safe_cuts_is_still_read_in_bounded_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "BLOCK_BYTES", 64)
    monkeypatch.setattr(data, "MAX_PENDING_CHARS", 256)
    path = tmp_path / "one_long_word.txt"
    path.write_text("x" * 2000)
    pieces = list(data.read_pieces(path))
    assert "".join(pieces) == "x" * 2000
    assert max(map(len, pieces)) <= 256 + 64


def test_folder_is_split_by_document(tmp_path: Path, bytes_tok: Tokenizer) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    docs = {"a.txt": "alpha\n", "b.txt": "beta\n", "c.txt": "gamma\n", ".hidden": "skip me"}
    for name, text in docs.items():
        (folder / name).write_text(text)
    out = prepare(str(folder), bytes_tok, tmp_path / "data", val_fraction=0.3)
    # Sorted by name, the last document validates; <|endoftext|> separates the others.
    eot = bytes_tok.eot_token
    assert read_tokens(out, "train").tolist() == [*b"alpha\n", eot, *b"beta\n"]
    assert read_tokens(out, "val").tolist() == [*b"gamma\n"]
    assert read_meta(out)["split"] == "documents"


@pytest.mark.parametrize(("sizes", "warned"), [((100, 100, 100), False), ((10, 10, 500), True)])
def test_a_document_split_far_from_val_fraction_is_warned_of(
    tmp_path: Path, bytes_tok: Tokenizer, caplog: pytest.LogCaptureFixture, sizes, warned
) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, size in zip("abc", sizes, strict=True):
        (folder / f"{name}.txt").write_text("x" * size)
    with caplog.at_level(logging.WARNING, logger="llm.data"):
        prepare(str(folder), bytes_tok, tmp_path / "data", val_fraction=0.3)
    # c.txt validates: a third of the tokens, or 500 of 521 (train: a, <|endoftext|>, b).
    assert ("the validation split is 96.0% of the tokens" in caplog.text) == warned


def test_glob_source(tmp_path: Path, bytes_tok: Tokenizer) -> None:
    (tmp_path / "texts").mkdir()
    for name in ("x.txt", "y.txt", "z.md"):
        (tmp_path / "texts" / name).write_text(f"{name} " * 20)
    out = prepare(str(tmp_path / "texts" / "*.txt"), bytes_tok, tmp_path / "data")
    assert out.name == "texts"
    assert len(read_meta(out)["sources"]) == 2


def test_rerun_with_unchanged_inputs_does_nothing(
    tmp_path: Path, text_file: Path, bytes_tok: Tokenizer
) -> None:
    out = prepare(str(text_file), bytes_tok, tmp_path / "data")
    files = [out / name for name in ("train.bin", "val.bin", "meta.json")]
    before = [f.stat().st_mtime_ns for f in files]
    prepare(str(text_file), bytes_tok, tmp_path / "data")
    assert [f.stat().st_mtime_ns for f in files] == before

    text_file.write_text("changed text " * 100)  # new inputs: prepared again
    prepare(str(text_file), bytes_tok, tmp_path / "data")
    assert bytes_tok.decode(read_tokens(out, "train")).startswith("changed text")


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_preparation_leaves_no_files(
    tmp_path: Path,
    text_file: Path,
    bytes_tok: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    interrupt: BaseException,
) -> None:
    monkeypatch.setattr(data, "BLOCK_BYTES", 256)
    calls = 0
    encode_array = bytes_tok.encode_array

    def failing_encode(text: str) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 5:  # mid-way, after earlier pieces were written
            raise interrupt
        return encode_array(text)

    monkeypatch.setattr(bytes_tok, "encode_array", failing_encode)
    with pytest.raises(type(interrupt)):
        prepare(str(text_file), bytes_tok, tmp_path / "data" / "here", num_threads=1)
    assert calls >= 5
    assert not (tmp_path / "data").exists()  # not even the folders it made


def test_a_failed_write_removes_only_the_empty_folders_made_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()  # the user's, empty
    with pytest.raises(RuntimeError), made_folder(Path("missing/../mine/new/deeper")):
        assert (tmp_path / "mine" / "new" / "deeper").is_dir()
        raise RuntimeError("the write failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # "missing" was never made
    assert not any((tmp_path / "mine").iterdir())


# --- Bad input -------------------------------------------------------------------------------


def test_missing_file_or_folder(tmp_path: Path, bytes_tok: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="not found: give a text file"):
        prepare(str(tmp_path / "missing.txt"), bytes_tok, tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare(str(tmp_path / "missing_folder/"), bytes_tok, tmp_path / "data")
    # A file that is there, but no regular file: said so, not "not found".
    with pytest.raises(FileNotFoundError, match="'/dev/null' is no regular file or folder"):
        prepare("/dev/null", bytes_tok, tmp_path / "data")


def test_an_empty_source_is_not_the_current_folder(
    tmp_path: Path, bytes_tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a text file in the current folder " * 20)
    with pytest.raises(FileNotFoundError, match="source '' not found: give a text file"):
        prepare("", bytes_tok, tmp_path / "data")


def test_empty_folder(tmp_path: Path, bytes_tok: Tokenizer) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no files"):
        prepare(str(tmp_path / "empty"), bytes_tok, tmp_path / "data")


def test_empty_file(tmp_path: Path, bytes_tok: Tokenizer) -> None:
    (tmp_path / "empty.txt").touch()
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        prepare(str(tmp_path / "empty.txt"), bytes_tok, tmp_path / "data")


def test_text_too_short_to_split_is_refused_and_nothing_written(
    tmp_path: Path, bytes_tok: Tokenizer
) -> None:
    (tmp_path / "one.txt").write_text("x")  # its one character validates: nothing trains
    with pytest.raises(DataError, match="the text makes 0 train and 1 val tokens"):
        prepare(str(tmp_path / "one.txt"), bytes_tok, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_binary_and_utf16_files_are_refused(tmp_path: Path, bytes_tok: Tokenizer) -> None:
    (tmp_path / "notes.txt").write_text("hello\n" * 20, encoding="utf-16")
    with pytest.raises(DataError, match=r"notes\.txt holds NUL bytes: it is binary or UTF-16"):
        prepare(str(tmp_path / "notes.txt"), bytes_tok, tmp_path / "data")


def test_prepared_data_is_never_read_as_a_source(tmp_path: Path, bytes_tok: Tokenizer) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text\n" * 20)
    # The output folder is <data_dir>/<folder name>: here the source folder itself.
    first = read_meta(prepare(str(tmp_path / "corpus"), bytes_tok, tmp_path))
    second = read_meta(prepare(str(tmp_path / "corpus"), bytes_tok, tmp_path))
    assert [s["path"] for s in second["sources"]] == [str(tmp_path / "corpus" / "a.txt")]
    assert second == first


def test_glob_that_matches_nothing(tmp_path: Path, bytes_tok: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="matches no files"):
        prepare(str(tmp_path / "*.nothing"), bytes_tok, tmp_path / "data")


@pytest.mark.parametrize("val_fraction", [0.0, 1.0])
def test_bad_val_fraction(
    tmp_path: Path, text_file: Path, bytes_tok: Tokenizer, val_fraction: float
) -> None:
    with pytest.raises(DataError, match="val_fraction must be between 0 and 1"):
        prepare(str(text_file), bytes_tok, tmp_path / "data", val_fraction=val_fraction)


def test_corpus_shorter_than_one_window(tmp_path: Path, bytes_tok: Tokenizer) -> None:
    (tmp_path / "short.txt").write_text("x" * 100)
    out = prepare(str(tmp_path / "short.txt"), bytes_tok, tmp_path / "data")
    with pytest.raises(DataError, match=r"has 90 tokens.*context_length \+ 1 = 129"):
        TrainWindows(out, context_length=128)


def test_non_utf8_bytes_are_replaced_and_reported(
    tmp_path: Path, bytes_tok: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "latin1.txt"
    # Two invalid sequences (Latin-1 "é" and a lone continuation byte) and one genuine,
    # validly encoded U+FFFD, which must not be counted.
    path.write_bytes(b"caf\xe9 ok\n" * 10 + b"\x80 and \xef\xbf\xbd\n")
    with caplog.at_level(logging.WARNING):
        out = prepare(str(path), bytes_tok, tmp_path / "data")
    assert read_meta(out)["sources"][0]["invalid_utf8"] == 11
    assert "11 byte sequences are not UTF-8" in caplog.text
    assert "\ufffd" in bytes_tok.decode(read_tokens(out, "train"))


def test_meta_from_another_tokenizer(
    tmp_path: Path, text_file: Path, bytes_tok: Tokenizer, tiny_ranks_file: Path
) -> None:
    prepare(str(text_file), bytes_tok, tmp_path / "data")
    module = TokenDataModule(
        source=str(text_file),
        data_dir=str(tmp_path / "data"),
        tokenizer_name="tiny",
        tokenizer_path=str(tiny_ranks_file),
        context_length=8,
    )
    with pytest.raises(DataError, match=r"prepared with tokenizer 'bytes'.*uses 'tiny'"):
        module.setup()
    module.prepare_data()  # stale for this tokenizer: prepared again, then it matches
    module.setup()


def test_data_of_other_ranks_under_the_same_name_are_prepared_again(
    tmp_path: Path, text_file: Path, tiny_ranks_file: Path
) -> None:
    before = load_tokenizer("tiny", path=tiny_ranks_file)
    out = prepare(str(text_file), before, tmp_path / "data")
    # The same name and size, other ranks: the last two merges ("in", "ng") come first.
    tokens = [
        base64.b64decode(line.split()[0]) for line in tiny_ranks_file.read_bytes().split()[::2]
    ]
    tokens[256:] = tokens[-2:] + tokens[256:-2]
    ranks = b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens))
    tiny_ranks_file.write_bytes(ranks)
    after = load_tokenizer("tiny", path=tiny_ranks_file)
    assert (after.name, after.vocab_size) == (before.name, before.vocab_size)
    with pytest.raises(DataError, match="prepared with other ranks for the tokenizer 'tiny'"):
        check_tokenizer(read_meta(out), after, out)
    prepare(str(text_file), after, tmp_path / "data")  # not "up to date": prepared again
    check_tokenizer(read_meta(out), after, out)
    text = text_file.read_bytes().decode()
    assert read_tokens(out, "train").tolist() == after.encode(text[: int(len(text) * 0.9)])


# --- Download --------------------------------------------------------------------------------


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1, and its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def use_remote(monkeypatch: pytest.MonkeyPatch, url: str, sha256: str) -> None:
    monkeypatch.setitem(data.REMOTE_SOURCES, "tinyshakespeare", RemoteText(url, sha256))


def test_download_is_checked_and_cached(
    tmp_path: Path,
    http_root: tuple[Path, str],
    bytes_tok: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, base = http_root
    content = corpus(50).encode()
    (root / "input.txt").write_bytes(content)
    use_remote(monkeypatch, f"{base}/input.txt", hashlib.sha256(content).hexdigest())
    out = prepare("tinyshakespeare", bytes_tok, tmp_path / "data")
    assert (out / "input.txt").read_bytes() == content
    (root / "input.txt").unlink()  # cached: no second download
    assert prepare("tinyshakespeare", bytes_tok, tmp_path / "data") == out


def test_download_with_wrong_checksum_caches_nothing(
    tmp_path: Path,
    http_root: tuple[Path, str],
    bytes_tok: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, base = http_root
    (root / "input.txt").write_text("not the expected text")
    use_remote(monkeypatch, f"{base}/input.txt", "0" * 64)
    with pytest.raises(DataError, match=r"has SHA-256 .* expected 0+; get the file some other way"):
        prepare("tinyshakespeare", bytes_tok, tmp_path / "data")
    assert not (tmp_path / "data").exists()  # nor the folders made for it


def test_failed_download_names_the_fallback(
    tmp_path: Path,
    http_root: tuple[Path, str],
    bytes_tok: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, base = http_root
    with socket.socket() as s:  # a port nothing listens on: the server is down
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/input.txt"
    for url in (f"{base}/missing.txt", down):  # 404, then connection refused
        use_remote(monkeypatch, url, "0" * 64)
        placed = re.escape(str(tmp_path / "data" / "tinyshakespeare" / "input.txt"))
        with pytest.raises(
            DataError, match=rf"could not download .*put it at {placed}, or .*data\.source="
        ):
            prepare("tinyshakespeare", bytes_tok, tmp_path / "data")
        assert not (tmp_path / "data").exists()  # nor the folders made for it


# --- Datasets --------------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path: Path, text_file: Path, bytes_tok: Tokenizer) -> Path:
    return prepare(str(text_file), bytes_tok, tmp_path / "data")


def test_windows_are_shifted_by_one(prepared: Path) -> None:
    tokens = torch.from_numpy(read_tokens(prepared, "train").astype(np.int64))
    train = TrainWindows(prepared, context_length=32, seed=1, rank=2)
    for i in range(20):
        x, y = train[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (32,)
        # The documented draw: the window of sample i starts at an offset from rng(seed, rank, i).
        offset = np.random.default_rng([1, 2, i]).integers(len(tokens) - 32)
        assert torch.equal(x, tokens[offset : offset + 32])
        assert torch.equal(y, tokens[offset + 1 : offset + 33])


def test_samples_depend_on_seed_rank_and_index_only(prepared: Path) -> None:
    def samples(seed: int, rank: int, start: int = 0) -> torch.Tensor:
        dataset = TrainWindows(prepared, context_length=16, seed=seed, rank=rank, start=start)
        return torch.stack([dataset[i][0] for i in range(8)])

    assert torch.equal(samples(0, 0), samples(0, 0))  # reproducible
    assert not torch.equal(samples(0, 0), samples(0, 1))  # ranks differ
    assert not torch.equal(samples(0, 0), samples(1, 0))  # seeds differ
    assert torch.equal(samples(0, 0, start=3)[:5], samples(0, 0)[3:])  # resume at sample 3


def test_same_seed_same_batches_with_workers(prepared: Path) -> None:
    dataset = TrainWindows(prepared, context_length=16, seed=7)

    def batches(num_workers: int) -> list[torch.Tensor]:
        loader = DataLoader(dataset, batch_size=4, num_workers=num_workers)
        return [x for (x, _), _ in zip(loader, range(3), strict=False)]

    first, again, workers = batches(0), batches(0), batches(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, workers, strict=True))


def test_val_windows_cover_the_val_split(prepared: Path) -> None:
    tokens = torch.from_numpy(read_tokens(prepared, "val").astype(np.int64))
    val = ValWindows(prepared, context_length=16)
    assert len(val) == (len(tokens) - 1) // 16
    xs = torch.cat([val[j][0] for j in range(len(val))])
    ys = torch.cat([val[j][1] for j in range(len(val))])
    assert torch.equal(xs, tokens[: len(xs)]) and torch.equal(ys, tokens[1 : len(ys) + 1])


def test_val_windows_are_whole_for_every_context_length_the_split_allows(prepared: Path) -> None:
    num_tokens = len(read_tokens(prepared, "val"))
    for context_length in (1, 2, 3, num_tokens // 2, num_tokens - 1):  # 1 divides it exactly
        val = ValWindows(prepared, context_length)
        assert len(val) == (num_tokens - 1) // context_length
        assert val[len(val) - 1][1].shape == (context_length,)  # the last target is in the split
        with pytest.raises(IndexError):
            val[len(val)]
    with pytest.raises(DataError, match=f"has {num_tokens} tokens, fewer than one window"):
        ValWindows(prepared, num_tokens)  # a window is context_length + 1 tokens


def test_each_side_of_a_split_of_documents_gets_at_least_one() -> None:
    assert data.val_documents(2, 0.9) == 1 and data.val_documents(2, 0.01) == 1
    assert data.val_documents(10, 0.3) == 3


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_validate_different_windows_as_many_each(prepared: Path, world_size: int) -> None:
    whole = ValWindows(prepared, context_length=16)
    ranks = [ValWindows(prepared, 16, rank, world_size) for rank in range(world_size)]
    assert {len(r) for r in ranks} == {len(whole) // world_size}  # FSDP steps all ranks together
    seen = [r[i][0] for i in range(len(ranks[0])) for r in ranks]  # window by window, in order
    assert all(torch.equal(x, whole[j][0]) for j, x in enumerate(seen))


def test_a_val_split_too_small_for_the_ranks_fails_clearly(prepared: Path) -> None:
    windows = len(ValWindows(prepared, context_length=16))
    with pytest.raises(DataError, match=f"has {windows} windows .* fewer than the {windows + 1} "):
        ValWindows(prepared, 16, rank=0, world_size=windows + 1)


# --- DataModule and CLI ----------------------------------------------------------------------


def bytes_datamodule(tmp_path: Path, text_file: Path, **options: Any) -> TokenDataModule:
    """A datamodule over ``text_file`` with the bytes tokenizer: windows of 16, batches of 4."""
    return TokenDataModule(
        source=str(text_file),
        data_dir=str(tmp_path / "data"),
        tokenizer_name="bytes",
        context_length=16,
        batch_size=4,
        **options,
    )


def test_datamodule_prepares_on_demand_and_batches(tmp_path: Path, text_file: Path) -> None:
    module = bytes_datamodule(tmp_path, text_file, seed=3)
    assert module.vocab_size == 257
    module.prepare_data()
    module.setup("fit")
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(module.val_dataloader()) > 0

    module.train_set.start = 4  # resume after one batch: the second batch of a fresh run
    resumed, _ = next(iter(module.train_dataloader()))
    module.train_set.start = 0
    loader = iter(module.train_dataloader())
    next(loader)
    assert torch.equal(resumed, next(loader)[0])


def test_loader_workers_outlive_the_signals_of_a_process_group(
    tmp_path: Path, text_file: Path
) -> None:
    # Ctrl-C and `timeout` signal every process of the group: the workers too. A worker killed
    # by one would make the main process raise before it saves its checkpoint.
    module = bytes_datamodule(tmp_path, text_file, num_workers=1)
    module.prepare_data()
    module.setup("fit")
    batches = iter(module.train_dataloader())
    next(batches)
    (worker,) = batches._workers  # the DataLoader's worker processes
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(worker.pid, signum)
    worker.join(timeout=1)
    assert worker.is_alive()
    x, _ = next(batches)
    assert x.shape == (4, 16)
    batches._shutdown_workers()
    assert not worker.is_alive()


def test_datamodule_under_a_lightning_trainer(tmp_path: Path, text_file: Path) -> None:
    module = bytes_datamodule(tmp_path, text_file)

    class Bigram(L.LightningModule):
        def __init__(self, vocab_size: int) -> None:
            super().__init__()
            self.logits = torch.nn.Embedding(vocab_size, vocab_size)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.logits(x).flatten(0, 1), y.flatten())

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
            self.log("val_loss", self.training_step(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        val_check_interval=2,  # the train set is endless, so validate by steps
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Bigram(module.vocab_size), datamodule=module)
    assert trainer.global_step == 4 and "val_loss" in trainer.callback_metrics


def run_cli(*args: str) -> int:
    """The script's exit code: what main returns, or the code it exits with."""
    main = runpy.run_path(str(REPO / "scripts" / "prepare_data.py"))["main"]
    try:
        return main(list(args))
    except SystemExit as exit:
        return exit.code


def test_output_folder_is_checked_before_any_work(
    tmp_path: Path, text_file: Path, bytes_tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"

    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match=r"data/story \(.* is not writable\): set --data-dir"):
        data.check_output_folder(str(text_file), data_dir, "--data-dir")
    assert not data_dir.exists()  # creates nothing
    monkeypatch.undo()
    if Path("/proc/self").is_dir():  # Linux: no file can be made there, not even by root
        with pytest.raises(ValueError, match=r"\(/proc is not writable\): set --data-dir"):
            data.check_output_folder(str(text_file), "/proc/data", "--data-dir")
    data.check_output_folder(str(text_file), data_dir, "--data-dir")
    assert list(tmp_path.iterdir()) == [text_file.parent]  # the try left nothing behind
    data.prepare(str(text_file), bytes_tok, data_dir)
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    # Prepared before: unchanged inputs are never written again, so a read-only folder is fine.
    data.check_output_folder(str(text_file), data_dir, "--data-dir")
    with pytest.raises(ValueError, match=f"{text_file} is not a folder"):
        data.check_output_folder(str(text_file), text_file, "--data-dir")


def test_cli_prepares_and_reports_errors_in_one_line(
    tmp_path: Path,
    text_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data_dir = str(tmp_path / "data")
    assert run_cli(str(text_file), "--data-dir", data_dir, "--tokenizer", "bytes") == 0
    assert (tmp_path / "data" / "story" / "train.bin").is_file()
    with monkeypatch.context() as patch:  # offline, loading GPT-2's ranks would fail first
        patch.setattr("llm.tokenizer.load_tokenizer", lambda *args: pytest.fail("loaded"))
        assert run_cli(str(tmp_path / "missing.txt")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: source") and "not found" in err[-1]
    assert run_cli(str(text_file), "--val-fraction", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--val-fraction: must be a number between 0 and 1, got '1'" in err[0]
    assert run_cli(str(text_file), "--data-dir", str(text_file / "data")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: cannot write in {text_file / 'data' / 'story'} ({text_file} is not a folder): "
        "set --data-dir to a folder you can write"
    ]


def test_cli_ctrl_c_is_one_line(
    tmp_path: Path,
    text_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(*args: object, **kwargs: object) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "prepare", interrupted)
    assert (
        run_cli(str(text_file), "--data-dir", str(tmp_path / "data"), "--tokenizer", "bytes") == 130
    )
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted")
