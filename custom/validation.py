"""Checks of the input files before training or inference, with every problem reported at once.

Each datalist entry (``{"case_id", "image": [t1, t1c, t2, flair] | 4-channel file, "label"}``) is checked for:
files that exist and read as NIfTI (the voxel data is read, so a truncated ``.nii.gz`` is caught), four sequences
or one file with exactly 4 channels first or last, one spatial shape and one affine for all files (label
included), no NaN/Inf, a non-empty brain, and label values in ``{0, 1, 2, et_label}``. Volumes are loaded one
at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .data import SEQUENCES

__all__ = ["CaseProblem", "validate_entries", "format_problems", "check_datalist"]

logger = logging.getLogger(__name__)

_N = len(SEQUENCES)
_EXPECTED = "4 sequence files (T1, T1c, T2, FLAIR) or one 4-channel file of shape (X, Y, Z, 4) or (4, X, Y, Z)"
_REGRID = "resample/co-register all sequences and the label onto one grid (same shape and affine)"


@dataclass
class CaseProblem:
    """One problem of one file of one case, and what to do about it."""

    case_id: str
    file: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.case_id}: {self.file}: {self.problem} -> {self.fix}"


@dataclass
class _Volume:
    path: str
    shape: tuple[int, ...]  # spatial shape
    affine: np.ndarray


def _read(path: str, case_id: str, problems: list[CaseProblem]) -> tuple[Any, np.ndarray] | None:
    """(image, data) of ``path``, or None after recording why it cannot be used."""
    p = Path(path)
    if not p.exists():
        problems.append(CaseProblem(case_id, path, "file not found", "check the path in the datalist / dataset_dir"))
        return None
    if not p.is_file():
        problems.append(CaseProblem(case_id, path, "not a file", "give the path of a .nii.gz file"))
        return None
    try:
        image = nib.load(str(p))
        data = np.asanyarray(image.dataobj)
    except Exception as e:  # noqa: BLE001 - truncated gzip (EOFError), bad header (ImageFileError), zlib errors, ...
        problems.append(
            CaseProblem(
                case_id,
                path,
                f"not a readable NIfTI ({type(e).__name__}: {e})",
                "re-download or re-export the file (a truncated .nii.gz is the usual cause)",
            )
        )
        return None
    return image, data


def _check_finite(data: np.ndarray, case_id: str, path: str, problems: list[CaseProblem]) -> None:
    if np.issubdtype(data.dtype, np.floating):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            problems.append(
                CaseProblem(
                    case_id, path, f"{bad} NaN/Inf voxel(s)", "replace NaN/Inf (e.g. by 0) or re-export the file"
                )
            )


def _label_values(data: np.ndarray) -> np.ndarray:
    if np.issubdtype(data.dtype, np.integer) and data.size and data.min() >= 0 and data.max() < 65536:
        counts = np.bincount(data.ravel().astype(np.int64, copy=False))
        return np.flatnonzero(counts)
    finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data
    return np.unique(finite)


def _format_values(values) -> str:
    return "[" + ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in values) + "]"


def _validate_entry(
    entry: dict, et_label: int, check_labels: bool, affine_tolerance: float
) -> tuple[list[CaseProblem], bool | None, set[int]]:
    """Problems of one entry, whether its label holds ``et_label`` (None: no usable label), and its label values."""
    problems: list[CaseProblem] = []
    images = entry.get("image") if isinstance(entry, dict) else None
    if isinstance(images, (str, Path)):
        images = [images]
    case_id = "?"
    if isinstance(entry, dict):
        case_id = str(entry.get("case_id") or (Path(str(images[0])).name if images else "?"))
    if not images or not isinstance(images, (list, tuple)):
        problems.append(CaseProblem(case_id, "-", f"entry has no 'image' list ({entry!r})", f"give {_EXPECTED}"))
        return problems, None, set()
    images = [str(p) for p in images]
    if len(images) not in (1, _N):
        problems.append(
            CaseProblem(case_id, ", ".join(images), f"{len(images)} image files", f"give {_EXPECTED} in this order")
        )
        return problems, None, set()
    if len(images) == _N:
        for i, path in enumerate(images):
            if path in images[:i]:
                problems.append(
                    CaseProblem(
                        case_id,
                        path,
                        f"the same file is given for {SEQUENCES[images.index(path)]} and {SEQUENCES[i]}",
                        "give each sequence its own file, in the order T1, T1c, T2, FLAIR",
                    )
                )

    reference: _Volume | None = None
    any_brain = False
    blank: list[CaseProblem] = []  # sequences that are zero everywhere (reported unless the whole case is)
    all_read = True

    def compare(vol: _Volume) -> None:
        nonlocal reference
        if reference is None:
            reference = vol
            return
        if vol.shape != reference.shape:
            problems.append(
                CaseProblem(
                    case_id, vol.path, f"shape {vol.shape} differs from {reference.shape} of {reference.path}", _REGRID
                )
            )
            return
        diff = float(np.max(np.abs(vol.affine - reference.affine)))
        if diff > affine_tolerance:
            problems.append(
                CaseProblem(
                    case_id,
                    vol.path,
                    f"affine differs from that of {reference.path} by up to {diff:.4g} "
                    f"(tolerance {affine_tolerance:g})",
                    _REGRID,
                )
            )

    for i, path in enumerate(images):
        read = _read(path, case_id, problems)
        if read is None:
            all_read = False
            continue
        image, data = read
        if len(images) == 1:
            shape = data.shape
            if data.ndim == 4 and shape[-1] == _N:
                channels = [data[..., c] for c in range(_N)]
            elif data.ndim == 4 and shape[0] == _N:
                channels = [data[c] for c in range(_N)]
            else:
                problems.append(CaseProblem(case_id, path, f"one file of shape {shape}", f"give {_EXPECTED}"))
                continue
            names = list(SEQUENCES)
        else:
            if data.ndim == 4 and data.shape[-1] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                problems.append(
                    CaseProblem(
                        case_id,
                        path,
                        f"{SEQUENCES[i]} has shape {data.shape}, expected one 3-D volume (X, Y, Z)",
                        f"give {_EXPECTED}",
                    )
                )
                continue
            channels, names = [data], [SEQUENCES[i]]
        compare(_Volume(path, tuple(int(s) for s in channels[0].shape), np.asarray(image.affine, dtype=np.float64)))
        _check_finite(data, case_id, path, problems)
        for name, channel in zip(names, channels):
            if np.any(channel):
                any_brain = True
            else:
                blank.append(
                    CaseProblem(
                        case_id,
                        path,
                        f"{name} is zero everywhere",
                        "the sequence is missing or blank: re-export it, or drop the case",
                    )
                )
        del data, channels

    if blank and not any_brain and all_read:
        problems.append(
            CaseProblem(case_id, images[0], "no non-zero voxel in any sequence (empty brain)", "re-export the case")
        )
    else:
        problems.extend(blank)

    et_found: bool | None = None
    values: set[int] = set()
    label = entry.get("label")
    if check_labels and label is not None:
        read = _read(str(label), case_id, problems)
        if read is not None:
            image, data = read
            if data.ndim == 4 and data.shape[-1] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                problems.append(
                    CaseProblem(
                        case_id, str(label), f"label has shape {data.shape}", "give one 3-D label volume (X, Y, Z)"
                    )
                )
            else:
                compare(_Volume(str(label), tuple(int(s) for s in data.shape), np.asarray(image.affine, np.float64)))
                _check_finite(data, case_id, str(label), problems)
                found = _label_values(data)
                values = {int(v) for v in found if float(v).is_integer()}
                allowed = {0, 1, 2, et_label}
                foreign = [v for v in found if not (float(v).is_integer() and int(v) in allowed)]
                if foreign:
                    fix = f"labels must be 0 background, 1 necrosis/non-enhancing core, 2 edema, {et_label} enhancing"
                    other = 3 if et_label == 4 else 4
                    if other in values:
                        era = "BraTS 2023+" if other == 3 else "BraTS 2018-2021"
                        fix += f"; value {other} suggests {era} labels: set et_label={other}"
                    problems.append(
                        CaseProblem(
                            case_id,
                            str(label),
                            f"label values {_format_values(foreign)} not in {_format_values(sorted(allowed))}",
                            fix,
                        )
                    )
                et_found = et_label in values
            del data
    return problems, et_found, values


def validate_entries(
    entries: list[dict], et_label: int, check_labels: bool = True, affine_tolerance: float = 1e-3
) -> list[CaseProblem]:
    """Every problem of every entry (an empty list when all are usable)."""
    problems: list[CaseProblem] = []
    for entry in entries:
        problems.extend(_validate_entry(entry, int(et_label), check_labels, affine_tolerance)[0])
    return problems


def format_problems(problems: list[CaseProblem]) -> str:
    """One line per problem: ``<case_id>: <file>: <problem> -> <fix>``."""
    return "\n".join(str(p) for p in problems)


def _et_message(et_label: int, n_labeled: int, other_count: int) -> str:
    other = 3 if et_label == 4 else 4
    msg = (
        f"ET label {et_label} never occurs in the labels of the {n_labeled} labeled case(s); "
        f"BraTS 2023+ data uses 3, 2018-2021 uses 4; set et_label"
    )
    if other_count:
        msg += f" (label value {other} occurs in {other_count} case(s): et_label={other} is likely right)"
    return msg


def check_datalist(
    entries: list[dict],
    et_label: int,
    skip_invalid: bool = False,
    check_labels: bool = True,
    require_et: bool = True,
    affine_tolerance: float = 1e-3,
) -> list[dict]:
    """Validate ``entries`` and return the usable ones.

    With problems, ``skip_invalid=False`` raises a ``ValueError`` listing all of them; ``skip_invalid=True`` logs
    them as a warning and returns only the good entries. With ``check_labels`` and ``require_et``, a set of labeled
    entries none of which contains ``et_label`` raises (the 4-vs-3 label trap), whatever ``skip_invalid`` says.
    """
    et_label = int(et_label)
    good: list[dict] = []
    problems: list[CaseProblem] = []
    n_labeled = n_et = n_other = 0
    other = 3 if et_label == 4 else 4
    for entry in entries:
        entry_problems, et_found, values = _validate_entry(entry, et_label, check_labels, affine_tolerance)
        if et_found is not None:
            n_labeled += 1
            n_et += bool(et_found)
            n_other += other in values
        if entry_problems:
            problems.extend(entry_problems)
        else:
            good.append(entry)
    et_trap = check_labels and require_et and n_labeled > 0 and n_et == 0
    if problems and not skip_invalid:
        n_bad = len({p.case_id for p in problems})
        msg = f"{len(problems)} problem(s) in {n_bad} of {len(entries)} case(s):\n{format_problems(problems)}\n"
        if et_trap:
            msg += _et_message(et_label, n_labeled, n_other) + "\n"
        raise ValueError(msg + "fix the files, or set skip_invalid=true to skip these cases")
    if et_trap:
        raise ValueError(_et_message(et_label, n_labeled, n_other))
    if problems:
        logger.warning(
            "skipping %d of %d case(s) with problems:\n%s",
            len(entries) - len(good),
            len(entries),
            format_problems(problems),
        )
        if not good:
            raise ValueError(f"no usable case left after skipping invalid ones:\n{format_problems(problems)}")
    return good
