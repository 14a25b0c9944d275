"""The lock of a run directory: one sweep at a time, and a killed sweep's lock taken over.

The lock is an ``flock`` on ``DIR/.hmoe-sim.lock``, which also records the holder (pid, host,
start time). The kernel drops an ``flock`` when its process ends, however it ends; a lock file
still naming a holder when the lock is free was left by a killed sweep and is taken over with a
notice. The lock file is opened without following a symbolic link: a link at its path is refused
with one line naming it, never written through.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hmoe_sim.files import refuse_symlink

__all__ = ["LOCK_FILE", "RunLocked", "hold_lock", "read_lock_info"]

LOCK_FILE = ".hmoe-sim.lock"


class RunLocked(ValueError):
    """The run directory is locked by another sweep (the message names the holder)."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_holder(info: dict[str, Any]) -> str:
    pid = info.get("pid", "?")
    host = info.get("host", "?")
    return f"pid {pid} on {host}, started {info.get('started', '?')}"


def read_lock_info(lock_path: Path) -> dict[str, Any]:
    """What a lock file records (``pid``, ``host``, ``started``); ``{}`` when missing or unreadable."""
    try:
        text = lock_path.read_text()
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


@contextlib.contextmanager
def hold_lock(directory: Path, notify: Callable[[str], None] | None = None, *,
              on_takeover: Callable[[Callable[[str], None]], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock of ``directory`` (created if needed) for the ``with`` block.

    Parameters
    ----------
    directory : Path
        The run directory; the lock file is ``directory / LOCK_FILE``.
    notify : callable, optional
        Receives the one-line notice of a stale lock taken over.
    on_takeover : callable, optional
        Called with ``notify`` after a stale lock was taken over (e.g. to remove the partial
        files the killed sweep left).

    Raises
    ------
    RunLocked
        When another process holds it; the message names that process (pid, host and
        start time).
    ValueError
        The lock path is a symbolic link or not a regular file (named).
    """
    say = notify if notify is not None else (lambda msg: None)
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / LOCK_FILE
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        refuse_symlink(lock_path)
        try:
            fd = os.open(lock_path, flags, 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP:  # a symbolic link planted after the check above
                refuse_symlink(lock_path)
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"{str(lock_path)!r} is not a regular file (the lock file of the run); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = read_lock_info(lock_path)
            who = _describe_holder(holder) if holder else "a process that has not recorded itself yet"
            raise RunLocked(f"run directory {str(directory)!r} is in use by another sweep ({who}); "
                            "wait for it to finish or stop it, or choose another --out") from None
        # the holder we waited on may have removed the file after we opened it: retry on the new one
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = read_lock_info(lock_path)
        if previous:
            pid = previous.get("pid")
            gone = "that process is gone" if isinstance(pid, int) and not _pid_alive(pid) else \
                "it no longer holds the lock"
            say(f"taking over the stale lock of a killed sweep ({_describe_holder(previous)}; {gone})")
            if on_takeover is not None:
                on_takeover(say)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        os.close(fd)
