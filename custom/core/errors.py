"""The errors of the bundle and its one boundary to the command line.

Library code raises ordinary exceptions: ``DataError`` for a problem with the user's data or settings, carrying the
``CaseProblem`` list (each with a ``kind``) so callers decide on kinds, never on message text. ``clean_exit`` is the
single place that turns a ``DataError`` into the clean exit config entry points need: MONAI's config evaluation wraps
every ``Exception`` in a ``RuntimeError`` traceback, while a ``SystemExit`` passes through to the terminal as one
message and exit status 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "CaseProblem",
    "DataError",
    "DatasetNotFound",
    "WeightsNotFound",
    "OutputDirLocked",
    "format_problems",
    "clean_exit",
]

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class CaseProblem:
    """One problem of one file of one case, and what to do about it. ``severity`` is ``"error"`` (the case cannot
    be used) or ``"warning"`` (it is used, but the result deserves a look); ``kind`` names the check that found it
    (``layout``, ``read``, ``grid``, ``finite``, ``content``, ``brain``, ``labels``, ``naming``, ...)."""

    case_id: str
    file: str
    problem: str
    fix: str
    severity: str = "error"
    kind: str = "data"

    def __str__(self) -> str:
        tag = "warning: " if self.severity == "warning" else ""
        return f"{self.case_id}: {self.file}: {tag}{self.problem} -> {self.fix}"


def format_problems(problems: Iterable[CaseProblem]) -> str:
    """One line per problem: ``<case_id>: <file>: <problem> -> <fix>``."""
    return "\n".join(str(p) for p in problems)


class DataError(ValueError):
    """A problem with the user's data or settings that the user has to fix: the message says what and how.
    ``problems`` holds the per-case problems behind it (empty when the problem is not a case's). A ``ValueError``,
    so that callers catching bad values keep working."""

    def __init__(self, message: str, problems: Sequence[CaseProblem] = ()) -> None:
        super().__init__(message, tuple(problems))  # all arguments: copies and pickles (worker processes) keep them
        self.message = message
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return self.message


class DatasetNotFound(DataError, FileNotFoundError):
    """``dataset_dir`` (a folder of cases or a datalist JSON) does not exist."""


class WeightsNotFound(DataError, FileNotFoundError):
    """A checkpoint, a folder of snapshots or a checkpoint pattern names no weights file."""


class OutputDirLocked(DataError):
    """Another live process is writing into the same ``output_dir``."""


def clean_exit(function: F) -> F:
    """``function`` for a config entry point or a command: a ``DataError`` ends the process with its message and
    exit status 1, without a traceback; every other exception is left as it is (a bug deserves its traceback)."""

    @functools.wraps(function)
    def entry_point(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except DataError as error:
            raise SystemExit(str(error)) from None

    return entry_point
