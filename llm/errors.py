"""How the scripts report what went wrong: one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import sys
import sysconfig
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import NoReturn

import hydra
import torch
from hydra._internal.utils import get_args_parser
from hydra.errors import ConfigCompositionException, InstantiationException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from llm.checks import meant_setting

# Errors that mean bad input: their message says what is wrong and how to fix it. Anything else
# is a bug and keeps its traceback. See also expected_errors().
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, OmegaConfBaseException)

# A process ended by a signal exits with 128 + the signal's number, as the shell reports it.
EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}

# Hydra's own messages that do not say how to fix what they refuse.
HYDRA_FIXES = {
    "Config group override must be a string or a list. Got NoneType": (
        "to leave a config group out, delete it: ~GROUP (e.g. ~logger), not GROUP=null"
    ),
}

# Hydra reads a comma in an unquoted value as a sweep, which a single run refuses with advice
# to quote it (key=\'a,b\') that a space in the value breaks.
AMBIGUOUS_VALUE = re.compile(r"Ambiguous value for argument '[+~]*([^=']+)=")

# Hydra's functions that make the run's output folder and write its config and log there,
# before the script's own code runs.
HYDRA_OUTPUT_WRITERS = {"run_job", "sweep", "launch", "configure_log", "_save_config"}
HYDRA_OUTPUT_FIX = (
    "Hydra writes the run's config and log there: set hydra.run.dir= (hydra.sweep.dir= with "
    "--multirun) to a folder you can write"
)


class Terminated(SystemExit):
    """SIGTERM, raised where it lands (see ``sigterm_raises``) as Ctrl-C raises
    KeyboardInterrupt; uncaught, the process exits with code 143."""

    def __init__(self) -> None:
        super().__init__(EXIT_CODES["SIGTERM"])


def expected_errors() -> tuple[type[BaseException], ...]:
    """``EXPECTED_ERRORS``, and Lightning's MisconfigurationException (a setting it refuses once
    the run has begun, such as too small a trainer.limit_val_batches fraction) where Lightning
    is loaded: only then can it be raised, and the scripts that need no Lightning start seconds
    sooner without it."""
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (*EXPECTED_ERRORS, lightning.MisconfigurationException) if lightning else EXPECTED_ERRORS


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when it has none."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def refused_config(error: InstantiationException) -> str | None:
    """What to print for a config that the class its ``_target_`` names refused, or None when
    the class failed in some other way (a bug, which keeps its traceback)."""
    cause = error.__cause__
    if str(error).startswith("Error locating target"):  # the _target_ names no class
        message = first_line(error).split(", set env var")[0]
    # An ImportError here: a package the class needs for a setting is missing (torch_xla, for
    # trainer.accelerator=tpu).
    elif isinstance(cause, (*expected_errors(), ImportError)) or (
        isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause)  # a typo
    ):
        message = first_line(cause)
    elif isinstance(cause, RuntimeError) and out_of_memory(cause):  # e.g. too big a model
        message = out_of_memory_message(cause)
    else:
        return None
    # Hydra names the config key in a line of its own: "full_key: callbacks.throughput".
    lines = str(error).splitlines()
    keys = [line.removeprefix("full_key: ") for line in lines if line.startswith("full_key: ")]
    return f"{keys[0]}: {message}" if keys else message


def written_by_hydra(error: OSError) -> bool:
    """Whether ``error`` came from Hydra making the run's output folder or writing in it: the
    innermost frame outside Python's standard library is one of Hydra's writers."""
    stdlib, hydra_dir = sysconfig.get_paths()["stdlib"], os.path.dirname(hydra.__file__)
    frames = [  # Hydra's own may lie inside the standard library's folder (site-packages)
        f
        for f in traceback.extract_tb(error.__traceback__)
        if f.filename.startswith(hydra_dir) or not f.filename.startswith(stdlib)
    ]
    if not frames:
        return False
    return frames[-1].filename.startswith(hydra_dir) and frames[-1].name in HYDRA_OUTPUT_WRITERS


def out_of_memory(error: RuntimeError) -> bool:
    """Whether ``error`` is torch failing to allocate memory, on a GPU or on the CPU."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def out_of_memory_message(error: RuntimeError) -> str:
    """The one line for a device that ran out of memory, with what to try."""
    return f"out of memory ({first_line(error)}); try a smaller batch, context or model"


def stdout_is_closed() -> bool:
    """Whether stdout's reader has gone away (``| head``): what is left to write cannot go."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    # The write that failed may have emptied the buffer, so the flush succeeds: ask the pipe
    # itself, which reports an error once its reader is gone (where poll exists: not Windows).
    if not hasattr(select, "poll"):
        return False
    try:
        stdout = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file: nothing to ask
        return False
    poller = select.poll()
    poller.register(stdout, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def sentence(text: str) -> str:
    """``text`` stripped and ending in a full stop, unless it ends in other punctuation."""
    text = text.strip()
    return text if text.endswith((".", "?", "!", ":")) else f"{text}."


# What OmegaConf raises for a key that is not in the config.
UNKNOWN_KEY_ERRORS = (ConfigAttributeError, ConfigKeyError)


def did_you_mean(error: OmegaConfBaseException) -> str | None:
    """``Did you mean trainer.max_steps?`` for a mistyped key, when a setting is close
    (``llm.checks.meant_setting``)."""
    parent, key = getattr(error, "parent_node", None), getattr(error, "key", None)
    if not isinstance(parent, DictConfig) or not isinstance(key, str):
        return None
    prefix = str(error.full_key)[: -len(key)]  # "trainer." of "trainer.max_stepz"
    meant = meant_setting(parent, key, [str(k) for k in parent], prefix)
    return f"Did you mean {meant}?" if meant else None


def quoting_fix(key: str) -> str:
    """How to give ``key`` a value as text on the command line, whatever it holds."""
    return f"""put it in quotes, inside the shell's: '{key}="..."'"""


def composition_error(error: ConfigCompositionException | OverrideParseException) -> str:
    """One line for what Hydra refuses while composing the config (a mistyped key, a group
    option that does not exist, an override that does not parse), from the five or more lines
    Hydra prints itself: its first line, the cause, a close key, and Hydra's suggested fix."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if isinstance(error, OverrideParseException) and error.override not in lines[0]:
        lines.insert(0, f"Could not parse the override '{error.override}'")
    if ambiguous := AMBIGUOUS_VALUE.match(lines[0]):
        key = ambiguous.group(1)
        lines = [
            lines[0],
            f"A comma makes a sweep, with --multirun, or a list ({key}=[a,b])",
            f"If the value is text, {quoting_fix(key)}",
        ]
    options = getattr(error, "options", None)  # a group option that does not exist
    if options:  # instead of Hydra's list, one per line, and its search path
        lines = [lines[0], f"Available options: {', '.join(options)}"]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):  # OmegaConf's first line says what is wrong
        lines.insert(1, first_line(cause))
        if isinstance(cause, UNKNOWN_KEY_ERRORS):
            close = did_you_mean(cause)
            parent, key = getattr(cause, "parent_node", None), getattr(cause, "key", None)
            if isinstance(parent, DictConfig) and str(cause.full_key) == str(key):
                # At the top, where the scripts refuse a key added with + that nothing reads
                # (llm.checks.check_known_keys): not Hydra's "use +key=...".
                settings = ", ".join(sorted(str(k) for k in parent if k != "hydra"))
                lines = [*lines[:2], close or f"The settings are {settings}"]
            elif close:
                lines.insert(2, close)
    if isinstance(error, OverrideParseException) and "=" in error.override:
        # Spaces, quotes, brackets, ':' or '=' in a value, or letters outside ASCII, stop
        # Hydra's parser unless the value is quoted.
        key = error.override.split("=", 1)[0].lstrip("+~")
        lines.append(f"If the value is text, {quoting_fix(key)}")
    return " ".join(sentence(line) for line in lines)


def run_hydra_main(main: Callable[[], object], sweeps: bool = True) -> None:
    """Run a ``@hydra.main`` function with every expected error in one line, Hydra's own
    included: Hydra prints those in many lines unless ``HYDRA_FULL_ERROR=1`` has it raise them
    (a bug then keeps its whole traceback). Without ``sweeps``, ``--multirun`` is refused: Hydra
    writes a sweep's ``multirun/`` folder before any job runs."""
    os.environ["HYDRA_FULL_ERROR"] = "1"
    with one_line_errors():
        arguments = hydra_command_line()
        # --cfg, --info and --help only print, even with -m.
        runs = not (arguments.cfg or arguments.info or arguments.help or arguments.hydra_help)
        multirun = arguments.multirun or any(
            re.fullmatch(r"[+~]*hydra\.mode=MULTIRUN", override) for override in arguments.overrides
        )
        if multirun and runs and not sweeps:
            raise ValueError(
                f"{Path(sys.argv[0]).name} runs no sweeps (--multirun would write Hydra's "
                "multirun/ folder): run it once for each value"
            )
        main()


def hydra_command_line() -> argparse.Namespace:
    """The command line as ``@hydra.main`` reads it, read first here: Hydra's parser prints its
    whole usage for a flag it does not know; here that is a one-line ValueError."""
    parser = get_args_parser()
    prog = Path(sys.argv[0]).name

    def refuse(message: str) -> NoReturn:
        # Hydra takes one run of key=value overrides: another after a flag is not read.
        unread = message.removeprefix("unrecognized arguments: ").split()
        overrides_after_a_flag = message.startswith("unrecognized arguments: ") and all(
            "=" in argument and not argument.startswith("-") for argument in unread
        )
        hint = "give the flags (-m, --cfg, ...) before or after all the key=value overrides"
        raise ValueError(
            f"{prog}: {message}: " + (hint if overrides_after_a_flag else "see --help")
        )

    parser.error = refuse  # type: ignore[method-assign]
    return parser.parse_args()


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with code 1."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Make SIGTERM raise ``Terminated``, as Ctrl-C raises KeyboardInterrupt: by default it
    would end the process on the spot, with no message, and leave the temporary files of a
    download or of data being prepared behind. Training replaces the handler with
    GracefulStop's, which saves a checkpoint first. Only the main thread may set one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_sigterm(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def ctrl_c_as_interrupt() -> Iterator[None]:
    """Give back the KeyboardInterrupt that Lightning turns into ``SystemExit(1)`` when Ctrl-C
    stops ``Trainer.fit``, so that it ends as any other Ctrl-C does (``one_line_errors``)."""
    try:
        yield
    except SystemExit as error:
        if isinstance(error.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise


@contextmanager
def one_line_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """Turn expected errors (bad input, a config Hydra or a class refuses, running out of
    memory) into ``error: <one line>`` and exit code 1, a closed stdout into a quiet exit, and
    Ctrl-C or SIGTERM into ``interrupted`` and exit code 130 or 143. A SystemExit passes through
    Hydra untouched, where an exception would come out as a traceback."""
    try:
        with sigterm_raises():
            yield
    except (ConfigCompositionException, OverrideParseException) as error:
        fail(composition_error(error))
    except BrokenPipeError as error:
        if not stdout_is_closed():  # another pipe: an error like any other
            fail(first_line(error))
        # Stop quietly, as Unix tools do; devnull takes what Python flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except expected_errors() as error:
        # OmegaConf adds lines about the node's type after its first, which says it all.
        message = first_line(error)
        if message in HYDRA_FIXES:
            message = f"{message}; {HYDRA_FIXES[message]}"
        elif isinstance(error, OSError) and written_by_hydra(error):
            message = f"{message}; {HYDRA_OUTPUT_FIX}"
        fail(message)
    except InstantiationException as error:
        # Hydra wraps what a config's class raised in lines of its own.
        message = refused_config(error)
        if message is None:
            raise
        fail(message)
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        fail(out_of_memory_message(error))
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(EXIT_CODES["SIGINT"])
    except Terminated:  # a SystemExit, which would pass with no word
        print(interrupted, file=sys.stderr)
        sys.exit(EXIT_CODES["SIGTERM"])
