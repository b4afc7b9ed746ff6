"""Checking a Hydra config's values, and the scripts' command-line numbers, before any work, so
that a mistyped or impossible value fails at once with one line naming the key and the fix."""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable, Collection, Iterable
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from llm.files import folder_problem
from llm.values import is_positive_finite

# (config key, the types it may have, a test of its value, what the test asks for in words)
Check = tuple[str, tuple[type, ...], Callable[[Any], bool], str]

INTEGER = (int,)
NUMBER = (int, float)  # an int is a fine float
OPTIONAL_INTEGER = (int, type(None))
OPTIONAL_NUMBER = (int, float, type(None))
BOOLEAN = (bool,)


def positive(value: Any) -> bool:
    """A test for ``check_values``: above zero, and finite."""
    return is_positive_finite(value)


def non_negative(value: Any) -> bool:
    """A test for ``check_values``: zero or above, and finite."""
    return 0 <= value < math.inf


def check_values(cfg: DictConfig, checks: Iterable[Check]) -> None:
    """Raise a one-line ValueError for the first value of ``cfg`` that fails its check."""
    for key, types, test, wanted in checks:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        # bool is an int in Python, but never a number of steps or a learning rate.
        right_type = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not right_type or not test(value):
            raise ValueError(f"{key} must be {wanted}, got {value!r}; override it as {key}=...")


def meant_setting(
    cfg: DictConfig, key: str, known: Collection[str], prefix: str = ""
) -> str | None:
    """The setting most likely meant by ``key``, unknown in ``cfg`` (whose settings are
    ``known``, under ``prefix``), as a dotted name: a close one beside it or, at the top (no
    ``prefix``), a close one deeper in ``cfg`` (``max_steps`` -> ``trainer.max_steps``); None
    if none is close."""
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return prefix + close[0]
    return None if prefix else _deeper_setting(cfg, key)


def _deeper_setting(cfg: DictConfig, key: str) -> str | None:
    """The setting of ``cfg``, at any depth, whose name is ``key`` or close to it, as a dotted
    name, other than ``key`` itself; None if none is. Hydra's own settings, and ``_target_``,
    are left out."""
    names: list[str] = []
    nested = [("", OmegaConf.to_container(cfg, resolve=False))]
    while nested:
        prefix, settings = nested.pop(0)  # shallowest first
        for name, value in settings.items():
            if prefix + str(name) not in ("hydra", key) and not str(name).startswith("_"):
                names.append(prefix + str(name))
                if isinstance(value, dict):
                    nested.append((f"{prefix}{name}.", value))
    last_parts = [name.rsplit(".", 1)[-1] for name in names]
    close = difflib.get_close_matches(key, last_parts, n=1)
    return names[last_parts.index(close[0])] if close else None


def check_known_keys(cfg: DictConfig, known: Collection[str], prefix: str = "") -> None:
    """Raise a one-line ValueError for a key of ``cfg`` that nothing reads: one added with
    Hydra's ``+key=value``, which Hydra itself suggests for a key it does not know; and for
    ``cfg`` itself where an override replaced the group with one value (``tokenizer=bytes``).
    At the top (no ``prefix``), a setting deeper in ``cfg`` may be the one meant."""
    settings = ", ".join(prefix + key for key in sorted(known))
    if not isinstance(cfg, DictConfig):
        raise ValueError(
            f"{prefix.rstrip('.')} holds settings ({settings}), not one value: override one of "
            f"them, as {prefix}{min(known)}=..."
        )
    for key in cfg:
        if key in known:
            continue
        meant = meant_setting(cfg, str(key), known, prefix)
        hint = f"did you mean {meant}?" if meant else f"the settings are {settings}"
        raise ValueError(f"{prefix}{key} is not a setting, and nothing would read it: {hint}")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number no smaller than ``minimum``."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value

    return whole_number


def fraction(text: str) -> float:
    """An argparse ``type``: a number between 0 and 1, both excluded."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:  # NaN is refused too
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}")
    return value


def output_folder(text: str) -> str:
    """An argparse ``type``: a folder to write in, there already or made when written to."""
    if problem := folder_problem(text):
        raise argparse.ArgumentTypeError(f"{problem}; give a folder you can write")
    return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a bad command line reported in one line, as llm reports any bad
    input, instead of a usage block and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")
