"""One run per output folder: an exclusive OS file lock (``flock``) on ``<folder>/.gadchat.lock``,
held for the writer's whole life. The kernel drops it when the process dies, SIGKILL included, so
a killed run leaves no stale lock; a lock file left behind by a killed run is simply locked anew.
The file holds the holder's PID and host, for the refusal of a second writer; it is removed when
the holder releases the lock normally, so a finished folder holds only what the run wrote.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".gadchat.lock"


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock; the message names the folder, PID and host."""


class FolderLock:
    """``with FolderLock(folder, what):`` holds ``folder``'s lock or raises FolderBusyError at once,
    without writing anything into a folder another process holds."""

    def __init__(self, folder, what: str = "a run"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self.handle = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")  # "a+": opening never truncates the holder's line
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "an unknown process"
                handle.close()
                raise FolderBusyError(
                    f"{self.folder} is in use by {holder} (lock {self.path}); one run per folder: wait for it to "
                    "end or stop it, or choose another folder") from None
            # The holder before us may have removed the file between our open and our lock: then we
            # locked a file nobody else will see; open the path again.
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        self.handle = handle
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{self.what} (PID {os.getpid()} on host {socket.gethostname()})\n")
            handle.flush()
        except OSError:  # a full disk: nothing of ours is left behind
            self.release()
            raise
        return self

    def release(self) -> None:
        if self.handle is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
