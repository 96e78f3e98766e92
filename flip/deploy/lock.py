"""One retrain per project at a time: an exclusive ``flock`` on ``<project>/.flip/retrain.lock``.

The lock is the kernel's, not the file's existence: ``fcntl.flock`` on an open descriptor, which the
kernel releases when the holder closes it or dies (kill -9, out of memory, a lost worker), so a lock
is never stale and nothing has to guess whether its owner is alive. The file holds the owner's record
(JSON: pid, host, flow-run id and name, start time), written after the lock is taken and emptied on a
clean release. A record found when taking the lock was therefore left by a run that died holding it:
``RetrainLock.previous`` returns it, so the new owner can say whose lock it took over. The pid and host
only name the owner in messages; they decide nothing (a pid can be reused, a host renamed).

The file is never deleted: deleting a lock file lets two processes lock two different inodes.
The descriptor is close-on-exec (Python's default), so the stage commands a run starts do not inherit
the lock; kill a whole run (its process group, as a worker or ``docker stop`` does), not only the flow
process, or an orphaned ``dvc repro`` keeps DVC's own repository lock until it ends.

Filesystems: ``flock`` is exact on a local disk. On NFS, Linux emulates it with byte-range locks
through the NFS lock manager, so it also holds between machines that mount the project (NFSv4, or v3
with lockd); on a ``nolock`` mount each machine sees only its own locks. A filesystem without locks
(``ENOLCK``) is an error, never an unlocked run.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flip.errors import FlipError

LOCK_FILE = Path(".flip") / "retrain.lock"


class LockHeld(Exception):
    """Another process holds the project's retrain lock; ``owner`` is its record (None if not yet written)."""

    def __init__(self, path: Path, owner: dict[str, Any] | None) -> None:
        self.path, self.owner = path, owner
        super().__init__(f"another retrain holds {path}: {describe(owner)}")


class LockError(FlipError):
    """The lock file cannot be locked at all (a filesystem without locks): fail, never run unlocked."""


def lock_path(project: str | Path) -> Path:
    """Where the project's retrain lock lives: ``<project>/.flip/retrain.lock`` (git-ignored)."""
    return Path(project).resolve() / LOCK_FILE


def describe(owner: dict[str, Any] | None) -> str:
    """The owner record in words: ``run <name> (<flow-run id>) (pid N on host H, started T)``."""
    if not owner:
        return "an owner that has not written its record yet"
    who = (f"run {owner['flow_run_name']} ({owner['flow_run_id']})" if owner.get("flow_run_name")
           else f"run {owner['flow_run_id']}" if owner.get("flow_run_id") else "a process outside Prefect")
    return f"{who} (pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')})"


def _read(fd: int, attempts: int = 1) -> dict[str, Any] | None:
    # the owner writes its record right after taking the lock: a reader may see the file empty for
    # that instant, hence a few short retries
    for i in range(attempts):
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
        if text:
            try:
                record = json.loads(text)
                return record if isinstance(record, dict) else {"record": text[:200]}
            except json.JSONDecodeError:
                if i == attempts - 1:
                    return {"record": text[:200]}
        if i < attempts - 1:
            time.sleep(0.02)
    return None


def read_owner(project: str | Path) -> dict[str, Any] | None:
    """The record in the lock file: the holder's, one left by a run that died, or None (free)."""
    path = lock_path(project)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read(fd)
    finally:
        os.close(fd)


def is_held(project: str | Path) -> bool:
    """Whether a live process holds the lock now (probes with a shared lock, released at once)."""
    import fcntl

    path = lock_path(project)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock


@dataclass
class RetrainLock:
    """The held lock. ``owner``: this process's record; ``previous``: the record of a run that died
    holding the lock (None when it was released cleanly). Release it, or use it as a context manager."""

    path: Path
    owner: dict[str, Any]
    previous: dict[str, Any] | None
    _fd: int | None = field(default=None, repr=False)

    def release(self) -> None:
        """Empty the record and unlock (closing the descriptor unlocks it); a second call does nothing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def __enter__(self) -> RetrainLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(project: str | Path, *, flow_run_id: str | None = None,
            flow_run_name: str | None = None) -> RetrainLock:
    """Take the project's retrain lock without waiting, or raise :class:`LockHeld` naming its owner.

    Creates ``.flip/`` and the lock file if missing; writes nothing else, and nothing at all when the
    lock is held by someone else."""
    import fcntl

    path = lock_path(project)
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read(fd, attempts=10)
        os.close(fd)
        raise LockHeld(path, owner) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise LockError(f"cannot lock {path} ({exc.strerror}): the filesystem of this project has no "
                            "file locks (e.g. NFS mounted with nolock). Fix: keep the project on a local disk "
                            "or a mount with locking, so that two retrains cannot overlap.") from None
        raise
    try:
        previous = _read(fd)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "flow_run_id": flow_run_id,
                 "flow_run_name": flow_run_name,
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        data = (json.dumps(owner) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return RetrainLock(path, owner, previous, fd)
