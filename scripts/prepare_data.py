"""Tokenize a text corpus into train.bin, val.bin and meta.json under the data folder.

    python scripts/prepare_data.py                      # Tiny Shakespeare, GPT-2 tokens
    python scripts/prepare_data.py corpus/ --tokenizer bytes
    python scripts/prepare_data.py "books/*.txt" --tokenizer-path ../shared/data/gpt2.tiktoken

Running it again with unchanged inputs does nothing. See llm/data.py for the details.
"""

from __future__ import annotations

import logging
import sys

from llm import data
from llm.checks import ArgumentParser, fraction
from llm.errors import one_line_errors
from llm.tokenizer import TokenizerOptions, load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source",
        nargs="?",
        default="tinyshakespeare",
        help="tinyshakespeare (downloaded), a text file, a folder of text files, or a glob",
    )
    parser.add_argument("--data-dir", default="data", help="output root (default: data)")
    parser.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding name, or bytes")
    parser.add_argument("--tokenizer-path", help="local tiktoken ranks file, e.g. gpt2.tiktoken")
    parser.add_argument("--val-fraction", type=fraction, default=0.1, help="default: 0.1")
    args, extra = parser.parse_known_args(argv)
    if extra and not any(arg.startswith("-") for arg in extra):  # a glob the shell expanded
        parser.error(
            f'one source at a time, got {len(extra) + 1}: quote a glob ("books/*.txt") to leave '
            "it to this script, or give their folder"
        )
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # Every output is written to a temporary file first, and those are gone after a Ctrl-C.
    with one_line_errors(interrupted="interrupted: no files were written"):
        data.check_source(args.source)  # before the tokenizer, which may be downloaded
        data.check_output_folder(args.source, args.data_dir, "--data-dir")
        options = TokenizerOptions("--tokenizer", "--tokenizer-path")
        tokenizer = load_tokenizer(args.tokenizer, args.tokenizer_path, options)
        data.prepare(args.source, tokenizer, args.data_dir, args.val_fraction)  # logs counts
    return 0


if __name__ == "__main__":
    sys.exit(main())
