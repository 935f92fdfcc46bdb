"""One run per output folder: an exclusive lock on the folder itself and on ``<output_dir>/.lock``, held for the
life of the process (or until ``release_output_dir``).

The lock is ``fcntl.flock`` on open files, so the kernel releases it when the process ends in any way (``kill -9``
included): a lock left by a killed run is stale by construction and the next run takes it over, and the resume after
a kill works unchanged. The primary lock is on the output folder's own directory entry, which cannot be deleted
while it holds files, so deleting ``.lock`` does not let a second run in; ``.lock`` is locked too (runs of older
versions lock only that file) and records the holder's PID and host for the message a second run prints. After
taking ``.lock`` the lock checks that the file it locked is still the one at that path (a run that deleted and
recreated it meanwhile is detected, and the lock retried).
On file systems without ``flock`` support the lock degrades to a PID check (``os.kill(pid, 0)``) on the same host.

Taking the lock first checks that the folder is writable (``DataError`` naming it otherwise), then removes the
temporary files that killed saves (``custom.core.io.atomic_path``) left in the folder and in its ``models/``
subfolder, the ones last modified before this process started.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

from custom.core.errors import OutputDirLocked
from custom.core.io import check_writable, remove_stale_temp_files

__all__ = ["lock_output_dir", "release_output_dir", "is_locked_here", "process_start_time", "OutputDirLocked"]

logger = logging.getLogger(__name__)
LOCK_NAME = ".lock"
TEMP_SUBFOLDERS = ("", "models")  # where lock_output_dir removes stale temporary files (the folder, its checkpoints)
_held: dict[str, tuple[int | None, int]] = {}  # real path of a locked folder -> (folder fd, .lock fd); re-entrant
_IMPORTED = time.time()


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def process_start_time() -> float:
    """When this process started (seconds since the epoch), from ``/proc``; the import of this module elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


def _locked(output_dir: str, holder: dict) -> OutputDirLocked:
    if holder.get("pid"):
        who = f"PID {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    else:  # its .lock was deleted or emptied: the folder's own lock still tells that a run holds it
        who = f"its {LOCK_NAME} file, which names the holder, was deleted or is empty"
    return OutputDirLocked(
        f"output_dir {output_dir} is in use by another run ({who}): wait for it to end, stop it, or pass another "
        "--output_dir"
    )


def _lock_folder(real: str, output_dir: str) -> int | None:
    """The locked descriptor of the folder itself; None where folders cannot be flocked (then .lock alone)."""
    try:
        descriptor = os.open(real, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise _locked(output_dir, _holder(os.path.join(real, LOCK_NAME))) from None
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


def _same_file(descriptor: int, path: str) -> bool:
    try:
        mine, now = os.fstat(descriptor), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def lock_output_dir(output_dir: str, rank: int | None = None) -> str:
    """Takes the lock of ``output_dir`` (created if missing) for this process and returns ``output_dir``.

    A second process that asks for the same folder ends with ``OutputDirLocked`` naming the PID that holds it; a
    folder that cannot be created or written ends with a ``DataError`` naming it. Within one process the call is
    re-entrant (training followed by evaluation). Ranks other than 0 of a distributed run do not lock (rank 0
    holds it for the job); ``rank`` defaults to torchrun's ``RANK``.
    """
    if int(os.environ.get("RANK", 0) if rank is None else rank) != 0:
        return output_dir
    check_writable(output_dir)
    real = os.path.realpath(output_dir)
    if real in _held:
        return output_dir
    folder = _lock_folder(real, output_dir)
    path = os.path.join(real, LOCK_NAME)
    try:
        descriptor = _lock_file(path, output_dir)
    except BaseException:
        if folder is not None:
            os.close(folder)
        raise
    previous = _holder(path)
    if previous.get("pid") and previous.get("pid") != os.getpid():
        logger.info(f"took over the stale lock of {output_dir} (PID {previous['pid']} is gone)")
    record = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    )
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, record.encode(), 0)
    _held[real] = (folder, descriptor)
    started = process_start_time()
    for sub in TEMP_SUBFOLDERS:
        remove_stale_temp_files(os.path.join(real, sub) if sub else real, older_than=started)
    return output_dir


def _lock_file(path: str, output_dir: str) -> int:
    """The locked descriptor of ``.lock``, checked to still be the file at ``path`` after locking."""
    for _ in range(10):
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise _locked(output_dir, _holder(path)) from None
        except OSError:  # no flock on this file system (some network mounts): fall back to a PID check
            holder = _holder(path)
            if (
                holder.get("host") == socket.gethostname()
                and _alive(int(holder.get("pid", -1)))
                and holder.get("pid") != os.getpid()
            ):
                os.close(descriptor)
                raise _locked(output_dir, holder) from None
            return descriptor
        if _same_file(descriptor, path):
            return descriptor
        os.close(descriptor)  # deleted or replaced between open and flock: lock the file that is there now
    raise OutputDirLocked(
        f"output_dir {output_dir}: its {LOCK_NAME} keeps being replaced while this run tries to lock it (another "
        "run is starting there): wait for it, or pass another --output_dir"
    )


def is_locked_here(output_dir: str) -> bool:
    """Whether this process holds the lock of ``output_dir``."""
    return os.path.realpath(output_dir) in _held


def release_output_dir(output_dir: str) -> None:
    """Releases this process's lock of ``output_dir`` (the end of the process does it too)."""
    held = _held.pop(os.path.realpath(output_dir), None)
    if held is None:
        return
    for descriptor in reversed([d for d in held if d is not None]):
        try:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(descriptor)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
