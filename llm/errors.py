"""How the scripts report what went wrong: one line on stderr, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException

# Errors that mean bad input: their message says what is wrong and how to fix it. Anything else
# is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, OmegaConfBaseException)
# What a class named by a config's _target_ raises on arguments it refuses: a Lightning Trainer
# on an impossible setting, any class on a keyword it does not take (a mistyped key).
BAD_ARGUMENTS = (*EXPECTED_ERRORS, MisconfigurationException, TypeError)


def first_line(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]


@contextmanager
def one_line_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """Turn expected errors into ``error: <first line>`` and exit code 1, and Ctrl-C into
    ``interrupted`` and exit code 130. A SystemExit passes through Hydra untouched, where an
    exception would come out as a traceback."""
    try:
        yield
    except EXPECTED_ERRORS as error:
        # OmegaConf adds lines about the node's type after its first, which says it all.
        print(f"error: {first_line(error)}", file=sys.stderr)
        sys.exit(1)
    except InstantiationException as error:
        # Hydra wraps what a config's class raised in lines of its own, one of which names the
        # config key ("full_key: callbacks.throughput"): show that key and the cause.
        cause = error.__cause__
        if not isinstance(cause, BAD_ARGUMENTS):
            raise
        lines = str(error).splitlines()
        keys = [line.removeprefix("full_key: ") for line in lines if line.startswith("full_key: ")]
        where = f"{keys[0]}: " if keys else ""
        print(f"error: {where}{first_line(cause)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
