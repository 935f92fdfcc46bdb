"""Safe output files: atomic writes (every file appears whole or not at all, and stays so after a power cut), the
clean-up of the temporary files a killed save leaves, a writability check of output folders, and case ids that are
plain file names.

``atomic_path`` writes to a hidden temporary file next to the target (``.<name>.<12 hex digits><suffix>``), fsyncs
it, renames it over the target (``os.replace``) and fsyncs the folder. A process killed while writing leaves that
temporary file behind (up to a whole checkpoint); ``remove_stale_temp_files`` removes the ones older than a given
time (the lock of an output folder calls it with the locking process's start time, so files of live writers stay).
"""

from __future__ import annotations

import contextlib
import logging
import ntpath
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence

from custom.core.errors import DataError

__all__ = ["atomic_path", "safe_case_id", "check_case_ids", "check_writable", "remove_stale_temp_files", "TEMP_FILE"]

logger = logging.getLogger(__name__)
# the temporary files of atomic_path: "." + target name + "." + 12 hex digits + the suffix (".tmp" or a format's)
TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{12}(\.tmp|\.nii\.gz|\.nii|\.zip|\.png|\.json|\.csv)$")


def _new_empty_file(folder: str, prefix: str, suffix: str) -> str:
    """Creates an empty file with a random name in ``folder`` the way ``open()`` does (mode 0666 less the umask),
    not with ``mkstemp``'s 0600: the renamed result then has the permissions the user's umask asks for."""
    for _ in range(100):
        candidate = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {folder}: clean up files named {prefix}*{suffix}.")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yields a temporary path next to ``path``; when the block ends it is renamed to ``path`` (``os.replace``),
    and when the block raises, or the process dies, the previous ``path`` stays as it was.

    ``suffix`` is the temporary file's ending, for writers that choose the format by extension (``.nii.gz``).
    The file gets the permissions of any newly created file (0666 less the umask).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _new_empty_file(folder, f".{os.path.basename(path)}.", suffix)
    try:
        yield tmp
        _fsync_file(tmp)  # the content reaches the disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)  # and the rename itself


def _fsync_file(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_folder(folder: str) -> None:
    """fsync of a folder (its entries); a no-op where folders cannot be opened or synced (some network mounts)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def check_writable(folder: str | os.PathLike, what: str = "output_dir") -> None:
    """``DataError`` naming ``folder`` unless it exists (it is created) and a file can be created and removed in
    it: a run finds a read-only or full output folder before its first case, not after it."""
    folder = str(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        os.remove(_new_empty_file(folder, ".write_test.", ".tmp"))
    except OSError as e:
        raise DataError(
            f"{what} {folder} is not writable ({e.strerror or type(e).__name__}"
            f"{': ' + e.filename if getattr(e, 'filename', None) and e.filename != folder else ''}): "
            f"fix its permissions or free space, or pass another --{what}"
        ) from None


def remove_stale_temp_files(folder: str | os.PathLike, older_than: float) -> list[str]:
    """Removes the temporary files of ``atomic_path`` (``TEMP_FILE``) directly in ``folder`` last modified before
    ``older_than`` (seconds since the epoch): leftovers of a save that was killed. Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in sorted(names):
        path = os.path.join(str(folder), name)
        if not TEMP_FILE.match(name):
            continue
        try:
            if not os.path.isfile(path) or os.path.islink(path) or os.path.getmtime(path) >= older_than:
                continue
            size = os.path.getsize(path)
            os.remove(path)
        except OSError:
            continue
        removed.append(path)
        logger.info(f"removed {path} ({size} bytes), the temporary file of a save that was killed")
    return removed


def _case_id_problem(case_id: object) -> str | None:
    """Why ``case_id`` cannot be an output file name ``<output_dir>/<case_id>.nii.gz``, or None."""
    if case_id is None or (isinstance(case_id, str) and not case_id.strip()):
        return "is empty"
    if not isinstance(case_id, str):
        return f"is not text ({type(case_id).__name__})"
    if "/" in case_id or "\\" in case_id:
        return "contains a path separator"
    if ".." in case_id:
        return "contains '..'"
    if ntpath.splitdrive(case_id)[0]:  # "C:x" on Windows
        return "is an absolute path"
    if "\x00" in case_id:
        return "contains a NUL character"
    return None


def safe_case_id(case_id: object, where: str = "case") -> str:
    """``case_id`` when it is a plain file name (outputs are ``<output_dir>/<case_id>...``), else ``ValueError``
    naming it: no path separators, no ``..``, not absolute, not empty."""
    problem = _case_id_problem(case_id)
    if problem:
        raise ValueError(
            f"{where}: case_id {case_id!r} {problem}; outputs are written to <output_dir>/<case_id>.nii.gz, so a "
            "case_id must be a plain file name (letters, digits, '-', '_', '.'): fix it in the datalist."
        )
    return case_id


def check_case_ids(entries: Mapping[str, Sequence[Mapping]] | Sequence[Mapping], where: str = "datalist") -> None:
    """Checks the ``case_id`` of every entry: a plain file name (see ``safe_case_id``) and unique, also across the
    keys of a datalist (``{"training": [...], "testing": [...]}``), since all predictions share one folder.
    ``ValueError`` lists every bad or repeated id with its key and index."""
    groups = entries.items() if isinstance(entries, Mapping) else [("", entries)]
    problems, seen = [], {}
    for key, group in groups:
        for i, entry in enumerate(group):
            case_id = entry.get("case_id") if isinstance(entry, Mapping) else None
            at = f"'{key}'[{i}]" if key else f"[{i}]"
            problem = _case_id_problem(case_id)
            if problem:
                problems.append(f"{at} {case_id!r} {problem}")
            elif case_id in seen:
                problems.append(f"{at} {case_id!r} repeats {seen[case_id]} (both would write {case_id}.nii.gz)")
            else:
                seen[case_id] = at
    if problems:
        raise ValueError(
            f"{where}: invalid case_id values: {'; '.join(problems)}. A case_id names the output file "
            "<output_dir>/<case_id>.nii.gz: use unique plain file names (no '/', '\\', '..', not absolute, not empty)."
        )
