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


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when it has none."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def refused_config(error: InstantiationException) -> str | None:
    """What to print for a config that the class its ``_target_`` names refused, or None when
    the class failed in some other way (a bug, which keeps its traceback)."""
    cause = error.__cause__
    if isinstance(cause, ImportError):  # the _target_ names no class
        message = first_line(error).split(", set env var")[0]
    elif isinstance(cause, (*EXPECTED_ERRORS, MisconfigurationException)) or (
        isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause)  # a typo
    ):
        message = first_line(cause)
    else:
        return None
    # Hydra names the config key in a line of its own: "full_key: callbacks.throughput".
    lines = str(error).splitlines()
    keys = [line.removeprefix("full_key: ") for line in lines if line.startswith("full_key: ")]
    return f"{keys[0]}: {message}" if keys else message


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
        # Hydra wraps what a config's class raised in lines of its own.
        message = refused_config(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
