"""Safe output files: atomic writes (every file appears whole or not at all) and case ids that are plain file names."""

from __future__ import annotations

import contextlib
import ntpath
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence

__all__ = ["atomic_path", "safe_case_id", "check_case_ids"]


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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
