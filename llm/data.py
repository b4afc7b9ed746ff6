"""From text to training batches: token files on disk, read back as windows of tokens.

Preparation (``prepare``) turns a source into ``<data_dir>/<name>/``:

- ``train.bin`` and ``val.bin``: every token id of the split, back to back, as uint16 when the
  vocabulary fits and uint32 otherwise;
- ``meta.json``: the tokenizer, vocabulary size, dtype, token counts, the sources' SHA-256
  checksums and the split settings.

A source is ``tinyshakespeare`` (downloaded once and cached as ``<data_dir>/tinyshakespeare/
input.txt``), a text file, a folder of text files or a glob. Each file is one document, and
``<|endoftext|>`` separates documents. The split is deterministic: with several documents the
last ones (a ``val_fraction`` of them) are the validation split; a single document is cut at
``val_fraction`` of its characters from the end, as nanoGPT does.

Preparation streams: text is read in blocks cut where the tokenizer splits anyway, encoded on
a thread pool and written as it comes, so memory stays flat however large the corpus. Output
goes to temporary files renamed into place at the end, and running it again on unchanged
inputs does nothing.

Reading: ``TrainWindows`` and ``ValWindows`` are plain ``torch.utils.data`` datasets over
numpy memmaps of the ``.bin`` files, and ``TokenDataModule`` wraps everything for Lightning.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import http.client
import itertools
import json
import logging
import os
import re
import signal
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from llm.files import atomic_path, check_folder
from llm.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "val")

# Text is read and encoded in pieces of about this many bytes: large enough that per-piece
# overhead vanishes, small enough that a few pieces in flight per thread cost little memory.
BLOCK_BYTES = 1 << 18

# If this much text holds no safe cut point (see _safe_cut), cut anyway to bound memory.
MAX_PENDING_CHARS = 16 * BLOCK_BYTES


class DataError(ValueError):
    """Bad input to data preparation or loading; the message says what to fix."""


# --- Sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteText:
    """A text file known by name, downloaded on first use and checked against its SHA-256."""

    url: str
    sha256: str


REMOTE_SOURCES: dict[str, RemoteText] = {
    "tinyshakespeare": RemoteText(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}

_GLOB_CHARS = re.compile(r"[*?\[]")


def dataset_name(source: str) -> str:
    """The folder name under the data dir for ``source``: a known name, or the file's stem,
    the folder's name, or the name of the folder a glob starts in."""
    if source in REMOTE_SOURCES:
        return source
    if _GLOB_CHARS.search(source):
        fixed = itertools.takewhile(lambda part: not _GLOB_CHARS.search(part), Path(source).parts)
        return Path(*fixed).resolve().name
    path = Path(source).resolve()
    return path.stem if path.is_file() else path.name


def check_output_folder(source: str, data_dir: str | Path, setting: str) -> None:
    """Fail now, in one line naming ``setting``, where ``source``'s prepared data could not go
    under ``data_dir``: something that is not a folder is in the way, or the data must still be
    written (it was never prepared) and the folder cannot be written in. Prepared data in a
    read-only folder is fine: unchanged inputs are never written again."""
    out_dir = Path(data_dir) / dataset_name(source)
    check_folder(out_dir, setting, writing=not (out_dir / "meta.json").is_file())


def source_files(source: str, data_dir: str | Path = "data") -> list[Path]:
    """The files of ``source`` in document order, downloading a known remote text if needed."""
    if source in REMOTE_SOURCES:
        remote = REMOTE_SOURCES[source]
        cached = Path(data_dir) / source / "input.txt"
        if not cached.is_file():  # download() only ever leaves a checked, whole file here
            download(remote.url, remote.sha256, cached)
        return [cached]
    if _GLOB_CHARS.search(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"the glob {source!r} matches no files: check the pattern")
        return files
    path = Path(source)
    if source and path.is_dir():  # Path("") is the current folder, never the user's choice
        # Every visible file directly in the folder, in name order; no recursion, so a folder
        # of documents never picks up prepared output or version-control files below it.
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"the folder {path} holds no files: add text files to it")
        return files
    if path.is_file():
        return [path]
    known = ", ".join(REMOTE_SOURCES)
    raise FileNotFoundError(
        f"source {source!r} not found: give a text file, a folder of text files, a glob, "
        f"or one of: {known}"
    )


def download(url: str, sha256: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` with a progress bar, keeping it only if its SHA-256 matches.

    Bytes go to a temporary file beside ``dest`` that is renamed into place once checked, so a
    failed, interrupted or corrupted download leaves nothing behind.
    """
    fallback = (
        f"get the file some other way and put it at {dest}, or give its path as the source "
        "(data.source=path/to/file.txt)"
    )
    digest = hashlib.sha256()
    with _atomic_output(dest) as out:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"download {dest.parent.name}"
                ) as bar:
                    while block := response.read(BLOCK_BYTES):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            raise DataError(f"could not download {url} ({err}); {fallback}") from None
        if digest.hexdigest() != sha256:
            raise DataError(
                f"the file downloaded from {url} has SHA-256 {digest.hexdigest()}, "
                f"expected {sha256}; {fallback}"
            )


# --- Reading text ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """One input document: where it is, and what a first pass over its bytes found."""

    path: Path
    size: int
    sha256: str
    chars: int
    invalid_utf8: int  # byte sequences that were not UTF-8 and became U+FFFD


def _decoded_blocks(path: Path) -> Iterator[tuple[bytes, str]]:
    """(raw bytes, decoded text) blocks of a file; invalid UTF-8 becomes U+FFFD.

    An incremental decoder carries characters split across block ends into the next block.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with path.open("rb") as f:
        while block := f.read(BLOCK_BYTES):
            yield block, decoder.decode(block)
    yield b"", decoder.decode(b"", final=True)


def scan(path: Path) -> SourceFile:
    """Size, SHA-256, character count and invalid UTF-8 count of a file, in one pass."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"source file {path} is empty: remove it or give a file with text")
    digest = hashlib.sha256()
    chars = replacements = genuine = 0
    tail = b""
    for raw, text in _decoded_blocks(path):
        if b"\0" in raw:  # text never holds NUL bytes; binary files and UTF-16 text do
            raise DataError(
                f"source file {path} holds NUL bytes: it is binary or UTF-16, not UTF-8 text; "
                "convert it to UTF-8 or leave it out"
            )
        digest.update(raw)
        chars += len(text)
        replacements += text.count("\ufffd")
        # U+FFFD written in the file as valid UTF-8 is text, not an error; count those to
        # subtract them. Two bytes of the previous block catch one split across blocks.
        genuine += (tail + raw).count(b"\xef\xbf\xbd")
        tail = raw[-2:]
    return SourceFile(path, size, digest.hexdigest(), chars, replacements - genuine)


# The last place in a text where cutting cannot change its tokens: just after a newline that
# sits between two visible ASCII characters, or just before a space that does. Pre-tokenizers
# (GPT-2's and tiktoken's later ones alike) never join a visible character to a following
# newline or space into one piece, and never run a newline or space into a following visible
# character except as a space prefix, so both sides of such a cut split exactly as the whole
# text would. A cut right after "\n\n" would not be safe: before a word GPT-2 encodes it as two
# "\n" tokens, but at the end of a text as one "\n\n" token. The greedy ".*" makes the match
# end at the last such place.
_SAFE_CUT = re.compile(r".*(?:[!-~]\n(?=[!-~])|[!-~](?= [!-~]))", re.DOTALL)


def _safe_cut(text: str) -> int:
    """Index of the last safe cut in ``text`` (see _SAFE_CUT), or 0 if there is none."""
    match = _SAFE_CUT.match(text)
    return match.end() if match else 0


def read_pieces(path: Path) -> Iterator[str]:
    """The text of a file in pieces of about BLOCK_BYTES, cut only where cutting cannot change
    the tokens: encoding the pieces one by one gives the tokens of the whole text."""
    pending = ""
    for _, text in _decoded_blocks(path):
        pending += text
        cut = _safe_cut(pending)
        if cut == 0 and len(pending) > MAX_PENDING_CHARS:
            log.warning("%s: no safe cut in %d characters, cutting anyway", path, len(pending))
            cut = len(pending)
        if cut:
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


# --- Preparing token files -------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare(
    source: str,
    tokenizer: Tokenizer,
    data_dir: str | Path = "data",
    val_fraction: float = 0.1,
    num_threads: int | None = None,
) -> Path:
    """Tokenize ``source`` into ``<data_dir>/<name>/`` (see the module docstring); return it.

    Does nothing when ``meta.json`` shows the same inputs (tokenizer, source checksums, split
    settings) and the ``.bin`` files are whole.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    out_dir = Path(data_dir) / dataset_name(source)
    # Where out_dir is the source folder (or a glob reaches into it), the files prepared
    # before must not be read as text.
    outputs = {(out_dir / name).resolve() for name in ("train.bin", "val.bin", "meta.json")}
    paths = [path for path in source_files(source, data_dir) if path.resolve() not in outputs]
    if not paths:
        raise FileNotFoundError(f"source {source!r} holds only prepared data: give text files")
    files = [scan(path) for path in paths]
    dtype = token_dtype(tokenizer.vocab_size)
    inputs = {
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.fingerprint,
        "sha256": [f.sha256 for f in files],
        "val_fraction": val_fraction,
    }
    if _is_prepared(out_dir, inputs):
        log.info("%s is up to date", out_dir)
        return out_dir

    for f in files:
        if f.invalid_utf8:
            log.warning(
                "%s: %d byte sequences are not UTF-8 and were replaced by U+FFFD",
                f.path,
                f.invalid_utf8,
            )
    # On an error, or Ctrl-C, nothing is written, and no folder made for it is left.
    with (
        _atomic_output(out_dir / "train.bin") as train_out,
        _atomic_output(out_dir / "val.bin") as val_out,
    ):
        counts = _encode_to(
            _pieces(files, val_fraction),
            tokenizer,
            dtype,
            {"train": train_out, "val": val_out},
            num_threads or os.cpu_count() or 1,
            total_chars=sum(f.chars for f in files),
        )
        # Until the new meta.json lands, the old one would wrongly vouch for the new files.
        (out_dir / "meta.json").unlink(missing_ok=True)
    meta = {
        "inputs": inputs,
        "dtype": dtype.name,
        "eot_token": tokenizer.eot_token,
        "split": "documents" if len(files) > 1 else "characters",
        "tokens": counts,
        "sources": [
            {
                "path": str(f.path),
                "bytes": f.size,
                "sha256": f.sha256,
                "invalid_utf8": f.invalid_utf8,
            }
            for f in files
        ],
    }
    with _atomic_output(out_dir / "meta.json") as out:
        out.write(json.dumps(meta, indent=2).encode() + b"\n")
    log.info(
        "%s: %s train and %s val tokens", out_dir, f"{counts['train']:,}", f"{counts['val']:,}"
    )
    val_share = counts["val"] / max(1, counts["train"] + counts["val"])
    if len(files) > 1 and not val_fraction / 2 <= val_share <= val_fraction * 2:
        log.warning(
            "%s: the validation split is %.1f%% of the tokens, for val_fraction=%g: it is the "
            "last %d of the %d files, whole; more files, of similar sizes, split closer to it",
            out_dir,
            100 * val_share,
            val_fraction,
            val_documents(len(files), val_fraction),
            len(files),
        )
    return out_dir


def val_documents(count: int, val_fraction: float) -> int:
    """Of ``count`` documents, how many (the last ones) validate: at least one on each side."""
    return min(max(round(count * val_fraction), 1), count - 1)


def _pieces(files: list[SourceFile], val_fraction: float) -> Iterator[tuple[str, str, bool]]:
    """(split, text, starts a document) for every piece of text, in order."""
    if len(files) == 1:
        # One document: the first (1 - val_fraction) of its characters train, the rest validate.
        split_at = int(files[0].chars * (1 - val_fraction))
        seen = 0
        for text in read_pieces(files[0].path):
            cut = split_at - seen
            if cut > 0:
                yield "train", text[:cut], seen == 0
            if cut < len(text):
                yield "val", text[max(cut, 0) :], False
            seen += len(text)
        return
    num_val = val_documents(len(files), val_fraction)
    for index, f in enumerate(files):
        split = "train" if index < len(files) - num_val else "val"
        for number, text in enumerate(read_pieces(f.path)):
            yield split, text, number == 0


def _encode_to(
    pieces: Iterator[tuple[str, str, bool]],
    tokenizer: Tokenizer,
    dtype: np.dtype,
    outputs: dict[str, BinaryIO],
    num_threads: int,
    total_chars: int,
) -> dict[str, int]:
    """Encode pieces on a thread pool and write their tokens in order; return token counts.

    tiktoken releases the GIL while encoding, so threads run in parallel. At most two pieces
    per thread are in flight, which keeps the pool busy while bounding memory.
    """
    counts = dict.fromkeys(SPLITS, 0)
    eot = np.array([tokenizer.eot_token], dtype=dtype)
    in_flight: deque[tuple[str, bool, int, Future[np.ndarray]]] = deque()

    def write_oldest() -> None:
        split, starts_document, chars, job = in_flight.popleft()
        if starts_document and counts[split]:  # <|endoftext|> between documents of a split
            eot.tofile(outputs[split])
            counts[split] += 1
        tokens = job.result()
        tokens.tofile(outputs[split])
        counts[split] += len(tokens)
        bar.update(chars)

    def encode(text: str) -> np.ndarray:
        return tokenizer.encode_array(text).astype(dtype, copy=False)

    pool = ThreadPoolExecutor(num_threads)
    try:
        with tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenize") as bar:
            for split, text, starts_document in pieces:
                in_flight.append((split, starts_document, len(text), pool.submit(encode, text)))
                if len(in_flight) >= 2 * num_threads:
                    write_oldest()
            while in_flight:
                write_oldest()
    finally:
        # On an error or Ctrl-C, drop the queued pieces instead of encoding them first.
        pool.shutdown(wait=True, cancel_futures=True)
    return counts


@contextmanager
def _atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only when the block completes (``atomic_path``)."""
    with atomic_path(path) as tmp, tmp.open("wb") as out:
        yield out


def _is_prepared(out_dir: Path, inputs: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds token files made from exactly these inputs."""
    try:
        meta = read_meta(out_dir)
    except DataError:
        return False
    if meta.get("inputs") != inputs:
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    return all(
        (out_dir / f"{split}.bin").is_file()
        and (out_dir / f"{split}.bin").stat().st_size == meta["tokens"][split] * itemsize
        for split in SPLITS
    )


def read_meta(dataset_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a prepared dataset folder."""
    path = Path(dataset_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path} not found: prepare the data first (scripts/prepare_data.py)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON: delete the folder and prepare again") from None


def check_tokenizer(meta: dict[str, Any], tokenizer: Tokenizer, dataset_dir: str | Path) -> None:
    """Raise if the data in ``dataset_dir`` was prepared with a different tokenizer."""
    inputs = meta["inputs"]
    made_with = (inputs["tokenizer"], inputs["vocab_size"])
    if made_with != (tokenizer.name, tokenizer.vocab_size):
        raise DataError(
            f"{dataset_dir} was prepared with tokenizer {made_with[0]!r} (vocab {made_with[1]}) "
            f"but this run uses {tokenizer.name!r} (vocab {tokenizer.vocab_size}): prepare it "
            f"again with this tokenizer, or switch back"
        )
    if inputs.get("tokenizer_sha256") != tokenizer.fingerprint:
        raise DataError(
            f"{dataset_dir} was prepared with other ranks for the tokenizer {tokenizer.name!r} "
            f"(another ranks file, or by an older llm): prepare it again with this tokenizer"
        )


# --- Datasets --------------------------------------------------------------------------------


class _TokenWindows(Dataset[tuple[Tensor, Tensor]]):
    """Windows of ``context_length + 1`` tokens from one split's memmapped token file, each
    returned as inputs ``x`` and targets ``y`` (int64, shifted by one token)."""

    def __init__(self, dataset_dir: str | Path, split: str, context_length: int) -> None:
        meta = read_meta(dataset_dir)
        self.path = Path(dataset_dir) / f"{split}.bin"
        self.dtype = np.dtype(meta["dtype"])
        self.context_length = context_length
        self.num_tokens = meta["tokens"][split]
        if context_length < 1:
            raise DataError(f"context_length must be at least 1, got {context_length}")
        if self.num_tokens < context_length + 1:
            raise DataError(
                f"the {split} split of {dataset_dir} has {self.num_tokens} tokens, fewer than "
                f"one window of context_length + 1 = {context_length + 1}: use a larger corpus "
                f"or a smaller context_length"
            )
        self.tokens = self._open()

    def _open(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    # A DataLoader worker started by spawn (macOS, Windows) receives the dataset pickled;
    # pickling a memmap would copy the whole corpus, so workers reopen the file instead.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "tokens"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.tokens = self._open()

    def window(self, offset: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the window that starts at token ``offset``."""
        chunk = torch.from_numpy(
            self.tokens[offset : offset + self.context_length + 1].astype(np.int64)
        )
        return chunk[:-1], chunk[1:]


class TrainWindows(_TokenWindows):
    """Training samples: windows at random offsets of the train split.

    Sample ``i`` is a pure function of ``(seed, rank, i)``: its offset is drawn from
    ``numpy.random.default_rng([seed, rank, i])``. Runs with the same seed see the same
    samples, distributed ranks see different ones, and order does not depend on the number of
    DataLoader workers.

    The dataset is map-style and practically endless (``len`` is 2**62), so one Lightning epoch
    lasts the whole run; bound training by steps. Resuming is trivial: with ``start=k`` item
    ``i`` is sample ``k + i``, so a run that consumed ``k`` samples per rank (batches done ×
    batch size) continues exactly where it stopped. Under DDP keep Lightning from wrapping the
    dataset in a DistributedSampler (``Trainer(use_distributed_sampler=False)``): ranks already
    differ, and that sampler would list all 2**62 indices.
    """

    ENDLESS = 2**62

    def __init__(
        self,
        dataset_dir: str | Path,
        context_length: int,
        seed: int = 0,
        rank: int = 0,
        start: int = 0,
    ) -> None:
        super().__init__(dataset_dir, "train", context_length)
        self.seed = seed
        self.rank = rank
        self.start = start

    def __len__(self) -> int:
        return self.ENDLESS - self.start

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range")
        rng = np.random.default_rng([self.seed, self.rank, self.start + index])
        # Offsets 0 .. num_tokens - context_length - 1 keep the whole window inside the file.
        return self.window(int(rng.integers(self.num_tokens - self.context_length)))


class ValWindows(_TokenWindows):
    """Validation samples: consecutive windows covering the val split, the same every time.

    Window ``j`` starts at token ``j * context_length``, so its targets continue exactly where
    the previous window's stopped and every token but the first is predicted once.

    Distributed, each of ``world_size`` ranks takes every ``world_size``-th window from window
    ``rank``, and every rank as many: under FSDP each step is a collective that all ranks must
    take. So up to ``world_size - 1`` windows at the end go unused.
    """

    def __init__(
        self, dataset_dir: str | Path, context_length: int, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(dataset_dir, "val", context_length)
        self.rank, self.world_size = rank, world_size
        windows = (self.num_tokens - 1) // context_length
        if windows < world_size:
            raise DataError(
                f"the val split of {dataset_dir} has {windows} windows of context_length "
                f"{context_length} tokens, fewer than the {world_size} ranks that share them: use "
                "a larger data.val_fraction or corpus, or a smaller context_length"
            )
        self.windows_per_rank = windows // world_size

    def __len__(self) -> int:
        return self.windows_per_rank

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range")
        return self.window((self.rank + index * self.world_size) * self.context_length)


# --- Lightning -------------------------------------------------------------------------------


class TokenDataModule(L.LightningDataModule):
    """Batches of ``(x, y)`` token windows for training and validation.

    Takes plain values, so Hydra can build it from config. ``prepare_data`` tokenizes the
    source when its ``.bin`` files are missing or stale; ``setup`` opens them and checks they
    match the tokenizer. Training needs ``vocab_size`` (and ``tokenizer``, to decode samples).

    Resuming: every checkpoint holds the samples each rank has used (``state_dict``), and a
    resumed run's loader starts at that sample of each rank, so it continues exactly where the
    checkpoint stopped (see ``TrainWindows``), with another ``batch_size`` or number of ranks
    too. Without a trainer the loader starts at ``start_sample``.
    """

    def __init__(
        self,
        source: str = "tinyshakespeare",
        data_dir: str = "data",
        tokenizer_name: str = "gpt2",
        tokenizer_path: str | None = None,
        context_length: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 1337,
        val_fraction: float = 0.1,
        start_sample: int = 0,
    ) -> None:
        super().__init__()
        self.source = str(source)  # a folder named 2024 comes from the command line as a number
        self.data_dir = data_dir
        self.tokenizer_name = tokenizer_name
        self.tokenizer_path = tokenizer_path
        self.context_length = context_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.start_sample = start_sample
        self.restored_samples: int | None = None  # a resumed run's, from its checkpoint
        self.first_step = 0  # the optimizer step the train loader started at
        self.train_set: TrainWindows | None = None
        self.val_set: ValWindows | None = None

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the text is encoded with (loaded once, on first use)."""
        return load_tokenizer(self.tokenizer_name, self.tokenizer_path)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size: the model's ``vocab_size``."""
        return self.tokenizer.vocab_size

    @property
    def dataset_dir(self) -> Path:
        """The folder of the source's prepared token files, under ``data_dir``."""
        return Path(self.data_dir) / dataset_name(self.source)

    def prepare_data(self) -> None:
        prepare(self.source, self.tokenizer, self.data_dir, self.val_fraction)

    def setup(self, stage: str | None = None) -> None:
        check_tokenizer(read_meta(self.dataset_dir), self.tokenizer, self.dataset_dir)
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        self.train_set = TrainWindows(self.dataset_dir, self.context_length, self.seed, rank)
        self.val_set = ValWindows(self.dataset_dir, self.context_length, rank, world_size)

    def train_dataloader(self) -> DataLoader:
        # Lightning restores the checkpoint (load_state_dict, the step) before it asks for this.
        trainer = self.trainer
        if self.train_set is not None:
            self.first_step = trainer.global_step if trainer else 0
            if self.restored_samples is not None:
                self.train_set.start = self.restored_samples
            elif trainer:  # a new run, or one resumed from a checkpoint without the count
                batches = trainer.global_step * trainer.accumulate_grad_batches
                self.train_set.start = batches * self.batch_size
            else:
                self.train_set.start = self.start_sample
        return self._loader(self.train_set)

    def state_dict(self) -> dict[str, int]:
        """The train samples each rank has used: checkpoints are taken between optimizer steps,
        each of ``accumulate_grad_batches`` batches."""
        trainer = self.trainer
        if self.train_set is None or trainer is None:
            return {}
        steps = trainer.global_step - self.first_step
        used = steps * trainer.accumulate_grad_batches * self.batch_size
        return {"samples_used": self.train_set.start + used}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.restored_samples = state_dict["samples_used"]

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def _loader(self, dataset: Dataset | None) -> DataLoader:
        if dataset is None:
            raise DataError("call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),  # pinned host memory copies to the GPU faster
            persistent_workers=self.num_workers > 0,
            # Every new iterator draws a worker seed from this generator. Left to the global
            # one, validation loaders would shift dropout's random stream and a resumed run
            # would no longer repeat an uninterrupted one. Windows never depend on it.
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=leave_stop_signals_to_the_main_process,
        )


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """Makes a DataLoader worker ignore SIGINT and SIGTERM. Ctrl-C, ``timeout`` and schedulers
    signal the whole process group; a worker they killed would make the main process raise at
    once, before it saves the checkpoint the signal asks for. The loader still shuts its workers
    down, and a worker whose main process died exits by itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
