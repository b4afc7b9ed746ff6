"""How the scripts report what went wrong: one line on stderr, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf.errors import OmegaConfBaseException

# Errors that mean bad input: their message says what is wrong and how to fix it. Anything else
# is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, OmegaConfBaseException)


@contextmanager
def one_line_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """Turn expected errors into ``error: <first line>`` and exit code 1, and Ctrl-C into
    ``interrupted`` and exit code 130. A SystemExit passes through Hydra untouched, where an
    exception would come out as a traceback."""
    try:
        yield
    except EXPECTED_ERRORS as error:
        # OmegaConf adds lines about the node's type after its first, which says it all.
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
