"""Writing files whole or not at all (a failed or interrupted write never leaves half a file, nor
an empty folder made for it), and checking before any work that a folder can be written in."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to, renamed to ``path`` when the block
    completes. It lies beside ``path`` (the same file system, so the rename is atomic) and is
    deleted on any error or Ctrl-C: ``path`` is always whole, old or new, or absent, and so are
    the folders made for it (``made_folder``)."""
    with atomic_paths(path) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(*paths: Path) -> Iterator[list[Path]]:
    """``atomic_path`` for files that belong together: every one is written and on the disk
    before the first is renamed into place, and the renames follow one another, so an error or
    Ctrl-C while writing leaves every old file as it was."""
    # The folder as the file system finds it: in ``missing/../name`` the file goes in the current
    # folder, where the temporary file is made, not in ``missing``.
    paths = tuple(path.parent.resolve() / path.name for path in paths)
    tmps: list[Path] = []
    with ExitStack() as folders:
        for path in paths:
            folders.enter_context(made_folder(path.parent))
        try:
            for path in paths:
                descriptor, tmp = tempfile.mkstemp(
                    dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
                )
                os.close(descriptor)
                tmps.append(Path(tmp))
            yield list(tmps)
            for tmp in tmps:
                # mkstemp makes the file private, and a writer may have replaced it; what llm
                # writes is for everyone to read.
                os.chmod(tmp, 0o644)
                with open(tmp, "rb") as written:  # on the disk before the rename, or a crash
                    os.fsync(written.fileno())  # could leave the new name on an empty file
            for tmp, path in zip(tmps, paths, strict=True):
                os.replace(tmp, path)
        finally:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)  # gone already if renamed


def link_atomically(source: Path, path: Path) -> None:
    """Make ``path`` a second name for the file ``source`` (a hard link: no copy of its bytes),
    replacing whatever ``path`` was in one step. Raises OSError where the file system has no hard
    links, leaving ``path`` as it was."""
    with atomic_path(path) as temporary:
        temporary.unlink()  # the name is free for the link
        os.link(source, temporary)


@contextmanager
def made_folder(path: Path) -> Iterator[None]:
    """Make the folder ``path`` (and the folders above it that are missing) for the block to
    write in. On any error or Ctrl-C, those made here that are still empty are removed again."""
    missing = _missing_folders(path)
    path.resolve().mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        with suppress(OSError):  # stops at the first that holds something
            for folder in missing:  # innermost first
                folder.rmdir()
        raise


def check_folder(path: str | Path, setting: str, writing: bool = True) -> None:
    """Fail now, in one line naming the ``setting`` to change, where ``path`` cannot be a
    folder (something that is not a folder is in its way) or, if ``writing``, cannot be written
    in (the nearest folder that exists is not writable). Creates nothing."""
    if problem := folder_problem(path, writing):
        raise ValueError(f"{problem}: set {setting} to a folder you can write")


def check_file(path: str | Path, setting: str) -> None:
    """Fail now, in one line naming the ``setting`` to change, where a file cannot be written
    at ``path``: no file name, a folder in its place, or a folder for it that cannot be made or
    written in (``check_folder``). Creates nothing."""
    if Path(path).name in ("", ".."):  # "", "." and "a/.." too
        problem = f"{str(path)!r} names no file"
    elif Path(path).is_dir():
        problem = f"cannot write the file {path}: it is a folder"
    else:
        problem = folder_problem(Path(path).parent)
    if problem:
        raise ValueError(f"{problem}: set {setting} to a file path you can write")


def folder_problem(path: str | Path, writing: bool = True) -> str | None:
    """Why ``path`` cannot be a folder, or cannot be written in if ``writing`` (see
    ``check_folder``), as a phrase; None if it can. Creates nothing."""
    if str(path) == "":  # Path("") is the current folder, never the user's choice
        return "an empty path is no folder"
    missing = _missing_folders(Path(path))
    existing = missing[-1].parent if missing else Path(path).resolve()
    if not existing.is_dir():
        return f"cannot write in {path} ({existing} is not a folder)"
    if writing and not _can_write_in(existing):
        return f"cannot write in {path} ({existing} is not writable)"
    return None


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder``: tried with a nameless temporary file, gone again
    at once. Permission bits alone mislead: root may write anywhere they say, except in folders
    such as /proc."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and the folders above it that do not exist, innermost first. Resolved: in
    ``missing/../mine`` the folder above ``mine`` is the current one, not ``missing``."""
    missing: list[Path] = []
    folder = path.resolve()
    while not os.path.lexists(folder):  # ends at the root at the latest
        missing.append(folder)
        folder = folder.parent
    return missing
