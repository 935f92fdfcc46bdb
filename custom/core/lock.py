"""One run per output folder: an exclusive lock on ``<output_dir>/.lock`` for the life of the process.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when the process ends in any way (``kill -9``
included): a lock left by a killed run is stale by construction and the next run takes it over, and the resume after
a kill works unchanged. The file records the holder's PID and host for the message a second run prints.
On file systems without ``flock`` support the lock degrades to a PID check (``os.kill(pid, 0)``) on the same host.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

from custom.core.errors import OutputDirLocked

__all__ = ["lock_output_dir", "release_output_dir", "OutputDirLocked"]

logger = logging.getLogger(__name__)
LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # real path of a locked folder -> open file descriptor (re-entrant within a process)


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def lock_output_dir(output_dir: str, rank: int | None = None) -> str:
    """Takes the lock of ``output_dir`` (created if missing) for this process and returns ``output_dir``.

    A second process that asks for the same folder ends with ``OutputDirLocked`` naming the PID that holds it.
    Within one process the call is re-entrant (training followed by evaluation). Ranks other than 0 of a
    distributed run do not lock (rank 0 holds it for the job); ``rank`` defaults to torchrun's ``RANK``.
    """
    if int(os.environ.get("RANK", 0) if rank is None else rank) != 0:
        return output_dir
    os.makedirs(output_dir, exist_ok=True)
    real = os.path.realpath(output_dir)
    if real in _held:
        return output_dir
    path = os.path.join(real, LOCK_NAME)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        holder = _holder(path)
        raise OutputDirLocked(
            f"output_dir {output_dir} is in use by another run (PID {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')}): wait for it to end, stop it, or pass "
            "another --output_dir"
        ) from None
    except OSError:  # no flock on this file system (some network mounts): fall back to a PID check
        holder = _holder(path)
        if (
            holder.get("host") == socket.gethostname()
            and _alive(int(holder.get("pid", -1)))
            and holder.get("pid") != os.getpid()
        ):
            os.close(descriptor)
            raise OutputDirLocked(
                f"output_dir {output_dir} is in use by another run (PID {holder['pid']}): wait for it, or pass another --output_dir"
            ) from None
    previous = _holder(path)
    if previous.get("pid") and previous.get("pid") != os.getpid():
        logger.info(f"took over the stale lock of {output_dir} (PID {previous['pid']} is gone)")
    record = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    )
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, record.encode(), 0)
    _held[real] = descriptor
    return output_dir


def release_output_dir(output_dir: str) -> None:
    """Releases this process's lock of ``output_dir`` (the end of the process does it too)."""
    descriptor = _held.pop(os.path.realpath(output_dir), None)
    if descriptor is not None:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
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
