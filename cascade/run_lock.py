"""An exclusive lock per run folder: one process at a time writes a run (or any output folder of a command).

The lock is an OS file lock (``fcntl.flock``) on ``<folder>/.lock``, held while the command lasts and released by
the OS when the process ends, however it ends (a SIGKILL included), so a crashed run never leaves a stale lock.
The file records the holder (pid, command, start time) for the message another process gets. The lock is
re-entrant within one process (a run that locks its folder can call code that locks it again).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # resolved folder -> nesting depth in this process


class RunLockedError(RuntimeError):
    """The folder is locked by another process; the message names the folder and the holder's pid."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} ({info.get('command', '?')}, since {info.get('since', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (pid not yet recorded)"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, wait: bool = False, command: str | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    wait: block until the holder finishes (logged) instead of raising :class:`RunLockedError` at once.
    command: what this process is doing, shown to a process that finds the folder locked (default: argv).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield folder / LOCK_FILE
        finally:
            _held[key] -= 1
        return
    path = folder / LOCK_FILE
    fd = _locked(folder, path, wait)
    try:
        what = command or " ".join([Path(sys.argv[0]).name if sys.argv else "?", *sys.argv[1:]])[:200]
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": what,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        _held[key] = 1
        try:
            yield path
        finally:
            del _held[key]
    finally:
        os.close(fd)  # releases the lock


def _locked(folder: Path, path: Path, wait: bool) -> int:
    """An open descriptor of ``path`` holding its exclusive lock. A holder that removes the folder (a failed
    command cleans up what it made) leaves the one it waited on locking a deleted file: the lock then guards
    nothing, so the waiter opens the folder's lock file anew and locks that."""
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(path)
                if not wait:
                    raise RunLockedError(f"run folder {folder} is in use by {holder}; wait for it to finish "
                                         "(or pass --wait to queue behind it)") from None
                log.info("run folder %s is in use by %s: waiting", folder, holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open at ``fd`` (not removed or replaced since it was opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
