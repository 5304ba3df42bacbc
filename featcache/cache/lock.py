"""One writer per cache: an advisory lock file next to it.

``flock`` locks are released by the kernel when their process dies, so a
lock left by a killed extraction cannot block anyone: the next run takes it
and says whose it was. The file's text names the holder for the refusal
message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from featcache.errors import UserError


def lock_path(cache: str | os.PathLike) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + ".lock")


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']} (started {info['since']}: {info['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class CacheLock:
    """``with CacheLock(cache, wait=False):`` holds the cache's write lock."""

    def __init__(self, cache: str | os.PathLike, *, wait: bool = False, on_wait=None):
        self.path = lock_path(cache)
        self.wait = wait
        self.on_wait = on_wait
        self.fd = None
        self.stale_holder = None

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
                if not self.wait:
                    os.close(fd)
                    raise UserError(f"{self.path.name[:-5]} is being written by {holder}; "
                                    "wait for it, or pass --wait to queue behind it") from None
                if self.on_wait:
                    self.on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            # The holder we waited for unlinks the file on release; a lock on
            # that unlinked inode protects nothing, so take the new file's.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            # The lock was free, yet a holder is written down: it was killed.
            self.stale_holder = _holder(previous)
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv[:1] + sys.argv[1:6])}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file means "released cleanly"
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
