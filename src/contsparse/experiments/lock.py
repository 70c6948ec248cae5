"""One process per run directory: an exclusive lock file that names its owner.

The lock is an OS advisory lock (``flock``) on ``<run>/.lock``, so it is released by the kernel
whatever way the owner dies (SIGKILL, power loss): a lock file left behind by a dead process is
stale and simply taken over. The file holds the owner's pid and host for the error message; it is
emptied, not deleted, on release (deleting it would let two processes lock two different files).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import TracebackType

from contsparse.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory exclusively or raises :class:`UserError`."""

    NAME = ".lock"

    def __init__(self, directory: Path, name: str = NAME, what: str = "run directory",
                 advice: str = "wait for that run to finish or stop it") -> None:
        self.path = Path(directory) / name
        self.what, self.advice = what, advice
        self._fd: int | None = None
        self.stale_owner: str | None = None  # who left a stale lock behind, if anyone

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = os.read(fd, 200).decode(errors="replace").strip()
            if not _try_lock(fd, previous):
                raise UserError(f"{self.what} {self.path.parent} is in use by {previous or 'another process'} "
                                f"(lock {self.path}); {self.advice}, or use another --out")
        except BaseException:
            os.close(fd)
            raise
        self.stale_owner = previous or None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no owner behind
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def holder(directory: Path) -> str | None:
    """Who holds the run directory's lock now (``"pid N on HOST"``), or None when no one does."""
    path = Path(directory) / RunLock.NAME
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while an exclusive holder runs
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # also drops the shared lock, if taken
    return None


def _try_lock(fd: int, owner: str) -> bool:
    if fcntl is not None:
        for attempt in range(5):  # holder() takes a shared lock for a moment: not an owner
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if attempt < 4:
                    time.sleep(0.01)
        return False
    # No flock: the lock is held while the recorded process is alive on this host.
    parts = owner.split()
    if len(parts) == 4 and parts[0] == "pid" and parts[3] == socket.gethostname():  # pragma: no cover
        try:
            os.kill(int(parts[1]), 0)
        except (OSError, ValueError):
            return True
        return int(parts[1]) == os.getpid()
    return True  # pragma: no cover
