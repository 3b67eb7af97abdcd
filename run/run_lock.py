"""One writer per run directory: `RUN/.lock` holds the holder's host, pid and process start time.

Two `bifocal train` into one directory (or a `--resume` while the first still runs) would both
write checkpoints and metrics. The lock is created atomically (O_EXCL); a second start is refused
with one line naming the holder. A lock left by a process that no longer exists on this host
(kill -9, power loss) is taken over; one from another host cannot be checked from here, so the
message says which file to delete.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from bifocal.core.errors import BifocalError

LOCK_NAME = ".lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return start is None or _start_time(pid) in (None, start)


class RunLock:
    """Hold `run_dir/.lock` between `acquire()` and `release()`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._created: list[Path] = []  # directories made for the lock, deepest first
        self._held = False

    def acquire(self) -> None:
        """Create the run directory if needed and take its lock, taking over a stale one from this
        host; raises BifocalError naming the holder when another live process holds it, or for an
        unreadable lock file."""
        self._created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}
        for _ in range(3):  # a stale lock is removed and creation retried; racing takers all retry
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        self._refuse(self._holder())

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        if holder is None and not self.path.exists():
            return  # released meanwhile
        if holder is None:
            raise BifocalError(f"{self.path}: unreadable run lock; if no bifocal process uses {self.run_dir}, "
                               f"delete that file")
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or _alive(pid, holder.get("start")):
            self._refuse(holder)
        try:
            self.path.unlink()  # its holder is gone: a stale lock from a killed run
        except FileNotFoundError:
            pass

    def _refuse(self, holder: dict | None) -> None:
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
        raise BifocalError(f"run directory {self.run_dir} is in use by {who} (lock {self.path}); wait for it to "
                           f"finish, or delete the lock if that process is gone (nothing was written)")

    def release(self) -> None:
        """Remove the lock, and the directories `acquire` made for it if nothing else was written
        there; nothing when it is not held."""
        if not self._held:
            return
        self._held = False
        try:
            self.path.unlink()
        except OSError:  # gone with its directory, or a read-only filesystem: nothing left to release
            pass
        for directory in self._created:  # made only for the lock: leave no trace if nothing else was written
            try:
                directory.rmdir()
            except OSError:
                break

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
