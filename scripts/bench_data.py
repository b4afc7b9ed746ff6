"""Benchmark data preparation against tiktoken's own batch encoding.

    python scripts/bench_data.py [--text ../shared/data/tinyshakespeare.txt]
                                 [--ranks ../shared/data/gpt2.tiktoken] [--synthetic-mb 200]

For Tiny Shakespeare and for a synthetic corpus of shuffled Tiny Shakespeare lines, it times
``llm.data.prepare`` (read, checksum, tokenize, write) next to tiktoken's
``encode_ordinary_batch`` on the same text in memory, and reports each one's peak memory. Every
measurement runs in a fresh process, so peak RSS belongs to that measurement alone.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from llm.checks import ArgumentParser, at_least
from llm.errors import one_line_errors

if TYPE_CHECKING:
    from llm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
T = TypeVar("T")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_ranks(ranks_path: str) -> Tokenizer:
    """The tokenizer in the ranks file given as ``--ranks``; imported here, in the measuring
    process, so that its imports count towards that process's memory."""
    from llm.tokenizer import TokenizerOptions, load_tokenizer

    return load_tokenizer(path=ranks_path, options=TokenizerOptions(name=None, path="--ranks"))


def tiktoken_batch(text_path: str, ranks_path: str, threads: int, repeat: int) -> float:
    """Best seconds for encode_ordinary_batch over the text, already in memory."""
    from llm.data import BLOCK_BYTES

    encoding = load_ranks(ranks_path).encoding
    text = Path(text_path).read_text()
    pieces = [text[i : i + BLOCK_BYTES] for i in range(0, len(text), BLOCK_BYTES)]
    group = 8 * threads
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        # In groups, so the token lists of a 200 MB corpus do not all sit in memory at once.
        for i in range(0, len(pieces), group):
            encoding.encode_ordinary_batch(pieces[i : i + group], num_threads=threads)
        times.append(time.perf_counter() - start)
    return min(times)


def prepare_run(
    text_path: str, ranks_path: str, threads: int, data_dir: str, repeat: int
) -> tuple[float, float, float, float]:
    """Best seconds for prepare, seconds for an up-to-date rerun, peak RSS after imports and
    at the end."""
    from llm.data import prepare

    tokenizer = load_ranks(ranks_path)
    rss_imports = peak_rss_mb()
    times = []
    for _ in range(repeat):
        shutil.rmtree(data_dir, ignore_errors=True)
        start = time.perf_counter()
        prepare(text_path, tokenizer, data_dir, num_threads=threads)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    prepare(text_path, tokenizer, data_dir, num_threads=threads)  # up to date: does nothing
    return min(times), time.perf_counter() - start, rss_imports, peak_rss_mb()


def in_fresh_process(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a freshly started Python, so that its imports and memory are its own."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=send_result, args=(sender, fn, *args))
    # The process starts with Ctrl-C ignored (it keeps what it inherits), so that it prints no
    # traceback of its own; at Ctrl-C this process ends it and says "interrupted".
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    sender.close()  # so that the pipe ends when the process does
    try:
        succeeded, value = receiver.recv()
    except EOFError:
        process.join()  # for its exit code: -N where signal N killed it
        raise ChildProcessError(
            f"the measuring process died (exit code {process.exitcode}): killed, or out of "
            "memory? try a smaller --synthetic-mb"
        ) from None
    except BaseException:  # Ctrl-C or SIGTERM
        process.terminate()
        raise
    finally:
        process.join()
    if not succeeded:
        raise value
    return value


def send_result(sender: Connection, fn: Callable[..., T], *args: object) -> None:
    """Run ``fn(*args)`` and send back (True, its result) or (False, the exception it raised)."""
    # Ended by the main process, exit as Python does: what multiprocessing made here (tqdm's
    # lock, a named semaphore) is then removed, not reported as leaked.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = (True, fn(*args))
    except Exception as error:
        result = (False, error)
    sender.send(result)


def write_synthetic(source: Path, dest: Path, megabytes: int) -> None:
    """About ``megabytes`` MB of the source's lines, shuffled again for every copy."""
    lines = source.read_text().splitlines(keepends=True)
    rng = np.random.default_rng(0)
    written = 0
    with dest.open("w") as out:
        while written < megabytes * 1e6:
            written += out.write("".join(lines[i] for i in rng.permutation(len(lines))))


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=SHARED / "tinyshakespeare.txt")
    parser.add_argument("--ranks", type=Path, default=SHARED / "gpt2.tiktoken")
    parser.add_argument("--synthetic-mb", type=at_least(1), default=200)
    parser.add_argument("--threads", type=at_least(1), default=os.cpu_count() or 1)
    parser.add_argument(
        "--repeat", type=at_least(1), default=3, help="runs per measurement; best counts"
    )
    args = parser.parse_args()
    for flag, path in (("--text", args.text), ("--ranks", args.ranks)):
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {path} is not a file; give one with {flag} PATH")
    try:
        text = args.text.read_bytes().decode()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--text {args.text} is not UTF-8 ({err.reason} at byte {err.start}); give a UTF-8 "
            "text file"
        ) from None
    if "\0" in text:  # refused by prepare(), after the table's header
        raise ValueError(f"--text {args.text} holds NUL bytes; give a text file")
    if not text.strip():  # the synthetic corpus repeats its lines
        raise ValueError(f"--text {args.text} holds no text; give a text file")
    load_ranks(str(args.ranks))  # a bad ranks file fails now, not after the table's header
    # No progress bars in the table: the measuring processes, started afresh, read it when
    # they import tqdm.
    os.environ["TQDM_DISABLE"] = "1"

    print(
        f"{args.threads} threads, {os.cpu_count()} CPUs, best of {args.repeat}; "
        f"MB = 10^6 bytes of UTF-8 text"
    )
    header = (
        f"| {'corpus':<16} | {'MB':>6} | {'tiktoken MB/s':>13} | {'prepare MB/s':>12} | "
        f"{'ratio':>5} | {'rerun s':>7} | {'peak RSS MB':>11} | {'RSS MB after imports':>20} |"
    )
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = Path(tmp) / "synthetic.txt"
        write_synthetic(args.text, synthetic, args.synthetic_mb)
        for name, path in ((args.text.stem, args.text), ("synthetic", synthetic)):
            megabytes = path.stat().st_size / 1e6
            # Best of a few runs: other load on the machine only ever slows a run down.
            base_s = in_fresh_process(
                tiktoken_batch, str(path), str(args.ranks), args.threads, args.repeat
            )
            prep_s, rerun_s, rss_imports, rss = in_fresh_process(
                prepare_run,
                str(path),
                str(args.ranks),
                args.threads,
                str(Path(tmp) / name),
                args.repeat,
            )
            print(
                f"| {name:<16} | {megabytes:>6.1f} | {megabytes / base_s:>13.1f} | "
                f"{megabytes / prep_s:>12.1f} | {base_s / prep_s:>5.0%} | {rerun_s:>7.2f} | "
                f"{rss:>11.0f} | {rss_imports:>20.0f} |"
            )


if __name__ == "__main__":
    with one_line_errors():
        main()
