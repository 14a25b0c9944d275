"""Every file the package writes, written one safe way: :func:`atomic_write`.

A file is written to a temporary name beside it, created exclusively (``O_EXCL``: an existing
file or symbolic link of that name is never opened) and without following a link
(``O_NOFOLLOW``), written through that open file, and moved in place with ``os.replace``. So a
reader sees the old file or the new one, never half of one; a killed writer leaves only its
temporary file; and a symbolic link at the target (planted in a run directory, pointing
anywhere) is refused with one line naming it, never written through.

Temporary names are recognisable: ``.<target name>.hmoe-sim-<pid>-<12 hex digits>.tmp``
(:func:`temporary_name`, :func:`is_own_temporary`). :func:`remove_own_temporaries` removes
only regular files whose names match that pattern exactly and whose writer process is gone,
so a user's own ``.tmp`` files, links and the temporaries of a live writer are left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["TEMPORARY_NAME_EXTRA", "atomic_write", "is_own_temporary", "refuse_symlink", "remove_own_temporaries",
           "temporary_name"]

_TAG = "hmoe-sim"
_TEMPORARY = re.compile(rf"^\.(?P<target>.+)\.{_TAG}-(?P<pid>[1-9][0-9]{{0,9}})-(?P<token>[0-9a-f]{{12}})\.tmp$")
#: the most characters a temporary name adds to its target's name (a pid of up to 10 digits)
TEMPORARY_NAME_EXTRA = len(f"..{_TAG}-{'9' * 10}-{'0' * 12}.tmp")


def temporary_name(target: str) -> str:
    """A fresh temporary name for the file ``target`` (a name, not a path), owned by this process."""
    return f".{target}.{_TAG}-{os.getpid()}-{secrets.token_hex(6)}.tmp"


def is_own_temporary(name: str) -> bool:
    """Whether ``name`` is exactly of the form :func:`temporary_name` gives."""
    return _TEMPORARY.match(name) is not None


def refuse_symlink(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` when it is a symbolic link (the package never writes through one)."""
    if path.is_symlink():
        try:
            where = f" (to {os.readlink(path)!r})"
        except OSError:  # pragma: no cover - removed meanwhile
            where = ""
        raise ValueError(f"{str(path)!r} is a symbolic link{where}; hmoe-sim writes only its own files and never "
                         "through a link: remove it")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(file)`` and move it in place atomically.

    Parameters
    ----------
    path : Path
        The target file (its directory is created if needed).
    write : callable
        Receives the temporary file, open for binary writing, and writes the content (e.g.
        ``frame.to_csv(f)``, ``fig.savefig(f, format="png")``, ``f.write(text.encode())``).

    Raises
    ------
    ValueError
        ``path`` is a symbolic link (named; nothing is written).
    OSError
        The write or the rename failed; the message names ``path``, never the temporary
        file, and the temporary file is removed.

    Notes
    -----
    The temporary file is created with mode ``0666`` less the process umask (the mode any
    newly created file gets), never ``0600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_symlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / temporary_name(path.name)
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        break
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        try:
            os.replace(tmp, path)
        except OSError as err:  # name the file that could not be replaced, not the temporary one
            raise OSError(err.errno, err.strerror, str(path)) from err
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_own_temporaries(directory: Path) -> int:
    """Remove the temporary files of :func:`atomic_write` in ``directory`` whose writer is gone.

    Only regular files (never links, directories or other kinds) whose name is exactly of
    the form :func:`temporary_name` gives and whose process id is no live process are
    removed; everything else is left alone.

    Returns
    -------
    int
        How many were removed.
    """
    removed = 0
    if not directory.is_dir() or directory.is_symlink():
        return removed
    for entry in os.scandir(directory):
        match = _TEMPORARY.match(entry.name)
        if match is None or _process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(entry.path).st_mode):
                os.unlink(entry.path)
                removed += 1
    return removed
