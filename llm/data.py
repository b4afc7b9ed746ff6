"""From text to token files on disk; ``llm.datamodule`` reads them back as batches.

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

This module imports neither torch's data utilities nor Lightning, so preparing data (and
reporting a missing source) starts in seconds.
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
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from llm.files import atomic_path, check_folder
from llm.tokenizer import Tokenizer

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
    # /dev/null or a pipe is there, but could not be read twice; Path("") is the current folder.
    problem = "is no regular file or folder" if source and path.exists() else "not found"
    raise FileNotFoundError(
        f"source {source!r} {problem}: give a text file, a folder of text files, a glob, "
        f"or one of: {known}"
    )


def check_source(source: str) -> None:
    """Fail now, in one line, where a local ``source`` holds no files, before a tokenizer is
    loaded or anything is written. A known remote text is checked when it is downloaded."""
    if source not in REMOTE_SOURCES:
        source_files(source)


def download(url: str, sha256: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` with a progress bar, keeping it only if its SHA-256 matches.

    Bytes go to a temporary file beside ``dest`` that is renamed into place once checked, so a
    failed, interrupted or corrupted download leaves nothing behind.
    """
    fallback = (
        f"get the file some other way and put it at {dest}, or give a local text file as the "
        "source (train.py: data.source=path/to/file.txt; prepare_data.py: path/to/file.txt)"
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
        if not (counts["train"] and counts["val"]):  # nothing to learn, or to measure it on
            raise DataError(
                f"{out_dir}: the text makes {counts['train']} train and {counts['val']} val "
                f"tokens (val_fraction={val_fraction}): give more text"
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
