"""The SQLite files a server keeps for itself, which its Gunicorn workers share: the text-vector cache and the
hard-example log's memory of recent queries. Every row in them can be computed again, so a file SQLite cannot read
(a disk fault, a copy cut short) is moved aside and a new one begun: a server that refused to start over one, or
stopped logging, would give up more than the file is worth."""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
from pathlib import Path
from typing import Iterator

# SQLITE_CORRUPT, SQLITE_NOTADB: the file's contents are unreadable (not a lock or a permission).
_UNREADABLE = (11, 26)


def unreadable(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused the file for its contents (not a lock or a permission): a server moves
    such a file aside and begins a new one; the embedded store only reports its own (it holds the documents)."""
    return getattr(exc, "sqlite_errorcode", None) in _UNREADABLE


def identity(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` (device, inode; None: none). A process that found its file unreadable moves it
    aside only if it is still the one at `path`: another process may have begun a new one there since."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def move_aside(path: Path) -> Path:
    """Move the file at `path` to PATH.unreadable (kept for a look) and delete its write-ahead log and shared memory,
    which must not be replayed into the new file begun at `path`. Returns where it went."""
    aside = path.with_name(path.name + ".unreadable")
    path.replace(aside)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return aside


@contextlib.contextmanager
def one_process_at_a_time(path: Path) -> Iterator[None]:
    """Held while a process opens (creates, upgrades, moves aside) the file at `path`. Gunicorn's workers open it
    together: SQLite answers the loser of the switch to WAL "database is locked" at once (no busy wait for that lock
    upgrade), and two processes both creating or altering a table collide."""
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
