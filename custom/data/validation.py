"""Checks of the input files before training or inference, with every problem of every case reported at once.

One small function per check; ``inspect_case`` runs them on one datalist entry (``{"case_id", "image": [t1, t1c,
t2, flair] | 4-channel file, "label"}``), ``preflight`` on many cases (in worker processes when asked) and
``preflight_datalist`` on a whole dataset before training: all folds, training and validation together,
incomplete cases included. The checks:

- the entry lists 4 sequence files (or one file with 4 channels first or last), each file once;
- every file exists and reads as NIfTI, voxel data included, so a truncated ``.nii.gz`` is caught;
- one spatial shape and one finite affine for all files of the case (label included);
- no NaN/Inf voxel; no sequence that is zero everywhere or one constant value; a non-empty brain;
- label values in {0, 1, 2, ``et_label``} (and 4, resection cavity, with ``label_scheme brats2024``).

Each file is read once. Inference runs the same data checks on the volumes it has already loaded
(``check_loaded_sequences``) after a header-only geometry check (``check_headers``), so nothing is read twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from custom.core.errors import CaseProblem, DataError, format_problems
from custom.core.labels import SCHEMES, allowed_labels, distinct_values
from custom.core.naming import SEQUENCES, split_channels

__all__ = [
    "CaseProblem",
    "CaseReport",
    "inspect_case",
    "preflight",
    "validate_entries",
    "format_problems",
    "check_datalist",
    "preflight_datalist",
    "check_headers",
    "check_loaded_sequences",
    "CheckSequencesd",
]

logger = logging.getLogger(__name__)

_N = len(SEQUENCES)
_EXPECTED = "4 sequence files (T1, T1c, T2, FLAIR) or one 4-channel file of shape (X, Y, Z, 4) or (4, X, Y, Z)"
_REGRID = "resample/co-register all sequences and the label onto one grid (same shape and affine)"
_RC_LABEL = SCHEMES["brats2024"].rc_label  # resection cavity in BraTS 2024+ post-treatment data (with ET 3)


@dataclass
class CaseReport:
    """What ``inspect_case`` found: problems, the label values present and whether ET is among them."""

    case_id: str
    problems: list[CaseProblem] = field(default_factory=list)
    label_values: set[int] = field(default_factory=set)
    et_found: bool | None = None  # None: no usable label

    @property
    def errors(self) -> list[CaseProblem]:
        return [p for p in self.problems if p.severity == "error"]


# ---------------------------------------------------------------------------------------------------------------
# single checks: each returns the problems it found


def check_layout(case_id: str, images: Any) -> list[CaseProblem]:
    """The entry names 4 sequence files or one 4-channel file, each file once."""
    if not images or not isinstance(images, (list, tuple)):
        return [CaseProblem(case_id, "-", f"entry has no 'image' list ({images!r})", f"give {_EXPECTED}")]
    if len(images) not in (1, _N):
        return [
            CaseProblem(case_id, ", ".join(images), f"{len(images)} image files", f"give {_EXPECTED} in this order")
        ]
    problems = []
    for i, path in enumerate(images):
        if path in images[:i]:
            first = SEQUENCES[images.index(path)]
            problems.append(
                CaseProblem(
                    case_id,
                    path,
                    f"the same file is given for {first} and {SEQUENCES[i]}",
                    "give each sequence its own file, in the order T1, T1c, T2, FLAIR",
                )
            )
    return problems


def read_nifti(case_id: str, path: str, header_only: bool = False) -> tuple[nib.Nifti1Image, np.ndarray | None, list]:
    """``(image, voxel data or None, problems)``; the voxel data is read (unless ``header_only``) so that a
    truncated gzip stream is caught here rather than in a data loader worker."""
    p = Path(path)
    if not p.exists():
        return (
            None,
            None,
            [CaseProblem(case_id, path, "file not found", "check the path in the datalist / dataset_dir")],
        )
    if not p.is_file():
        return None, None, [CaseProblem(case_id, path, "not a file", "give the path of a .nii.gz file")]
    try:
        image = nib.load(str(p))
        data = None if header_only else np.asanyarray(image.dataobj)
    except Exception as e:  # noqa: BLE001 - truncated gzip (EOFError), bad header (ImageFileError), zlib errors, ...
        problem = f"not a readable NIfTI ({type(e).__name__}: {e})"
        fix = "re-download or re-export the file (a truncated .nii.gz is the usual cause)"
        return None, None, [CaseProblem(case_id, path, problem, fix)]
    return image, data, []


def check_affine(case_id: str, path: str, affine: np.ndarray) -> list[CaseProblem]:
    """A header affine with NaN or Inf places the volume nowhere: geometry round trips would be garbage."""
    if np.all(np.isfinite(affine)):
        return []
    return [
        CaseProblem(
            case_id, path, "the header's affine holds NaN/Inf", "fix the qform/sform of the file (re-export it)"
        )
    ]


def check_same_grid(
    case_id: str, volumes: Sequence[tuple[str, tuple[int, ...], np.ndarray]], affine_tolerance: float = 1e-3
) -> list[CaseProblem]:
    """Every ``(path, spatial shape, affine)`` equals the first one's shape and (within tolerance) affine."""
    problems = []
    if not volumes:
        return problems
    ref_path, ref_shape, ref_affine = volumes[0]
    for path, shape, affine in volumes[1:]:
        if shape != ref_shape:
            problems.append(
                CaseProblem(case_id, path, f"shape {shape} differs from {ref_shape} of {ref_path}", _REGRID)
            )
            continue
        if not (np.all(np.isfinite(affine)) and np.all(np.isfinite(ref_affine))):
            continue  # reported by check_affine
        diff = float(np.max(np.abs(affine - ref_affine)))
        if diff > affine_tolerance:
            problem = f"affine differs from that of {ref_path} by up to {diff:.4g} (tolerance {affine_tolerance:g})"
            problems.append(CaseProblem(case_id, path, problem, _REGRID))
    return problems


def check_finite(case_id: str, path: str, data: np.ndarray, name: str | None = None) -> list[CaseProblem]:
    """NaN/Inf voxels: one of them turns the z-score of its whole channel into NaN."""
    if not np.issubdtype(data.dtype, np.floating):
        return []
    n_nan = int(np.count_nonzero(np.isnan(data)))
    n_inf = int(data.size - n_nan - np.count_nonzero(np.isfinite(data)))
    if not (n_nan or n_inf):
        return []
    what = ", ".join(f"{n} {kind} voxel(s)" for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
    return [
        CaseProblem(
            case_id, path, f"{name + ': ' if name else ''}{what}", "replace NaN/Inf (e.g. by 0) or re-export the file"
        )
    ]


def check_sequence_content(
    case_id: str, path: str, name: str, data: np.ndarray, blank_severity: str = "error"
) -> list[CaseProblem]:
    """A sequence that is zero everywhere (a missing sequence filled with zeros) or one constant value carries no
    image: the network sees a channel it was never trained on."""
    finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data
    if finite.size == 0:
        return []  # all NaN: reported by check_finite
    low, high = float(finite.min()), float(finite.max())
    if low == high == 0:
        fix = "the sequence is missing or blank: re-export it, or drop the case"
        return [CaseProblem(case_id, path, f"{name} is zero everywhere", fix, blank_severity, kind="blank")]
    if low == high:
        problem = f"{name} has the constant value {low:g} everywhere"
        return [CaseProblem(case_id, path, problem, "re-export the sequence", kind="constant")]
    return []


def check_label_values(
    case_id: str, path: str, data: np.ndarray, et_label: int, label_scheme: str | None = None
) -> tuple[list[CaseProblem], set[int]]:
    """Label values outside {0, 1, 2, et_label} (plus RC 4 for ``brats2024``), with the likely fix; and the values."""
    found = distinct_values(data)
    values = {int(v) for v in found if float(v).is_integer()}
    allowed = set(allowed_labels(label_scheme, et_label=int(et_label))) if label_scheme else {0, 1, 2, int(et_label)}
    foreign = [v for v in found if not (float(v).is_integer() and int(v) in allowed)]
    if not foreign:
        return [], values
    fix = f"labels must be 0 background, 1 necrosis/non-enhancing core, 2 edema, {et_label} enhancing"
    if et_label == 3 and _RC_LABEL in values:
        fix += "; value 4 is the resection cavity of BraTS 2024+ post-treatment data: set label_scheme brats2024"
    elif et_label == 4 and 3 in values:
        fix += "; value 3 suggests BraTS 2023+ labels: set et_label=3 (label_scheme brats2023)"
    if et_label == 3 and _RC_LABEL in values and 3 not in values:
        fix += ", or et_label=4 if these are BraTS 2018-2021 labels"
    problem = f"label values {_format_values(foreign)} not in {_format_values(sorted(allowed))}"
    return [CaseProblem(case_id, path, problem, fix, kind="labels")], values


def _format_values(values) -> str:
    return "[" + ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in values) + "]"


def _split_channels(case_id: str, path: str, data: np.ndarray) -> tuple[list[np.ndarray] | None, list[CaseProblem]]:
    """The 4 channels of a 4-channel file (channels last or first)."""
    channels = split_channels(data)
    if channels is None:
        return None, [CaseProblem(case_id, path, f"one file of shape {data.shape}", f"give {_EXPECTED}", kind="layout")]
    return channels, []


def _as_volume(case_id: str, path: str, data: np.ndarray, what: str) -> tuple[np.ndarray | None, list[CaseProblem]]:
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        fix = f"give {_EXPECTED}" if what in SEQUENCES else "give one 3-D label volume (X, Y, Z)"
        return None, [
            CaseProblem(case_id, path, f"{what} has shape {data.shape}, expected one 3-D volume (X, Y, Z)", fix)
        ]
    return data, []


def check_brain(
    case_id: str, path: str, content_problems: list[CaseProblem], n_sequences: int, all_read: bool
) -> list[CaseProblem]:
    """All sequences blank means an empty brain, reported once instead of once per sequence."""
    blank = [p for p in content_problems if p.kind == "blank"]
    if all_read and n_sequences == _N and len(blank) == _N:
        return [CaseProblem(case_id, path, "no non-zero voxel in any sequence (empty brain)", "re-export the case")]
    return list(content_problems)


# ---------------------------------------------------------------------------------------------------------------
# one case, many cases


def _case_id(entry: Any) -> str:
    if not isinstance(entry, dict):
        return "?"
    images = entry.get("image")
    first = images if isinstance(images, (str, Path)) else (images[0] if images else None)
    return str(entry.get("case_id") or (Path(str(first)).name if first else "?"))


def inspect_case(
    entry: dict,
    et_label: int = 4,
    check_labels: bool = True,
    affine_tolerance: float = 1e-3,
    label_scheme: str | None = None,
    blank_severity: str = "error",
) -> CaseReport:
    """Runs every check on one datalist entry, reading each file once; never raises for bad data."""
    case_id = _case_id(entry)
    report = CaseReport(case_id)
    if isinstance(entry, dict) and entry.get("error"):  # found incomplete by dataset discovery
        report.problems.append(
            CaseProblem(
                case_id, entry.get("folder", "-"), entry["error"], entry.get("fix", "complete or remove the case")
            )
        )
        return report
    images = entry.get("image") if isinstance(entry, dict) else None
    images = [images] if isinstance(images, (str, Path)) else images
    layout = check_layout(case_id, [str(p) for p in images] if isinstance(images, (list, tuple)) else images)
    report.problems += layout
    if layout and (not isinstance(images, (list, tuple)) or len(images) not in (1, _N)):
        return report
    images = [str(p) for p in images]

    grid: list[tuple[str, tuple[int, ...], np.ndarray]] = []
    content: list[CaseProblem] = []
    n_sequences, all_read = 0, True
    for i, path in enumerate(images):
        image, data, problems = read_nifti(case_id, path)
        report.problems += problems
        if image is None:
            all_read = False
            continue
        if len(images) == 1:
            channels, problems = _split_channels(case_id, path, data)
            names = list(SEQUENCES)
        else:
            volume, problems = _as_volume(case_id, path, data, SEQUENCES[i])
            channels, names = (None, []) if volume is None else ([volume], [SEQUENCES[i]])
        report.problems += problems
        if channels is None:
            continue
        affine = np.asarray(image.affine, dtype=np.float64)
        report.problems += check_affine(case_id, path, affine)
        grid.append((path, tuple(int(s) for s in channels[0].shape), affine))
        report.problems += check_finite(case_id, path, data)
        for name, channel in zip(names, channels):
            content += check_sequence_content(case_id, path, name, channel, blank_severity)
            n_sequences += 1
        del data, channels
    report.problems += check_brain(case_id, images[0], content, n_sequences, all_read)

    label = entry.get("label")
    if check_labels and label is not None:
        image, data, problems = read_nifti(case_id, str(label))
        report.problems += problems
        volume = None
        if image is not None:
            volume, problems = _as_volume(case_id, str(label), data, "label")
            report.problems += problems
        if volume is not None:
            affine = np.asarray(image.affine, np.float64)
            report.problems += check_affine(case_id, str(label), affine)
            grid.append((str(label), tuple(int(s) for s in volume.shape), affine))
            report.problems += check_finite(case_id, str(label), volume)
            problems, report.label_values = check_label_values(case_id, str(label), volume, et_label, label_scheme)
            report.problems += problems
            report.et_found = int(et_label) in report.label_values
    report.problems += check_same_grid(case_id, grid, affine_tolerance)
    return report


def _inspect_star(args: tuple) -> CaseReport:
    entry, kwargs = args
    return inspect_case(entry, **kwargs)


def preflight(entries: Sequence[dict], num_workers: int = 0, **kwargs) -> list[CaseReport]:
    """``inspect_case`` of every entry, in entry order; ``num_workers > 1`` spreads the cases over that many
    processes (reading and decompressing NIfTI files is CPU bound). Keyword arguments go to ``inspect_case``."""
    entries = list(entries)
    workers = min(int(num_workers or 0), len(entries))
    if workers <= 1:
        return [inspect_case(entry, **kwargs) for entry in entries]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_inspect_star, [(entry, kwargs) for entry in entries], chunksize=1))


def validate_entries(
    entries: list[dict], et_label: int, check_labels: bool = True, affine_tolerance: float = 1e-3, **kwargs
) -> list[CaseProblem]:
    """Every problem of every entry (an empty list when all are usable)."""
    reports = preflight(
        entries, et_label=int(et_label), check_labels=check_labels, affine_tolerance=affine_tolerance, **kwargs
    )
    return [p for report in reports for p in report.problems]


def _et_message(et_label: int, n_labeled: int, other_count: int) -> str:
    other = 3 if et_label == 4 else 4
    msg = (
        f"ET label {et_label} never occurs in the labels of the {n_labeled} labeled case(s); "
        f"BraTS 2023+ data uses 3, 2018-2021 uses 4; set et_label"
    )
    if other_count:
        msg += f" (label value {other} occurs in {other_count} case(s): et_label={other} is likely right)"
    return msg


@dataclass
class _Verdict:
    good: list[dict]
    problems: list[CaseProblem]
    n_bad: int
    et_trap: str | None


def _judge(
    entries: list[dict], reports: list[CaseReport], et_label: int, check_labels: bool, require_et: bool
) -> _Verdict:
    good, problems, n_bad = [], [], 0
    labeled = [r for r in reports if r.et_found is not None]
    for entry, report in zip(entries, reports):
        if report.errors:
            n_bad += 1
        else:
            good.append(entry)
    for report in sorted(reports, key=lambda r: r.case_id):  # one block of lines per case, in case order
        problems += report.problems
    et_trap = None
    if check_labels and require_et and labeled and not any(r.et_found for r in labeled):
        other = 3 if et_label == 4 else 4
        et_trap = _et_message(et_label, len(labeled), sum(other in r.label_values for r in labeled))
    return _Verdict(good, problems, n_bad, et_trap)


def _stop_on_errors(verdict: _Verdict, n_entries: int, skip_invalid: bool, what_to_do: str) -> None:
    """Raises ``DataError`` with every error of ``verdict`` (unless ``skip_invalid``) and with the ET trap (always)."""
    errors = [p for p in verdict.problems if p.severity == "error"]
    et_hint = " (--et_label 3 or 4)"
    if errors and not skip_invalid:
        legend = " (case: file: problem -> what to do)"
        message = (
            f"{len(errors)} problem(s) in {verdict.n_bad} of {n_entries} case(s){legend}:\n{format_problems(errors)}\n"
        )
        if verdict.et_trap:
            message += verdict.et_trap + et_hint + "\n"
        raise DataError(message + what_to_do, verdict.problems)
    if verdict.et_trap:
        raise DataError(verdict.et_trap + et_hint, verdict.problems)


def check_datalist(
    entries: list[dict],
    et_label: int,
    skip_invalid: bool = False,
    check_labels: bool = True,
    require_et: bool = True,
    affine_tolerance: float = 1e-3,
    num_workers: int = 0,
    label_scheme: str | None = None,
) -> list[dict]:
    """Validate ``entries`` and return the usable ones; ``DataError`` (with the ``CaseProblem`` list) otherwise.

    With problems, ``skip_invalid=False`` raises listing all of them; ``skip_invalid=True`` logs them as a warning and
    returns only the good entries. With ``check_labels`` and ``require_et``, a set of labeled entries none of which
    contains ``et_label`` raises (the 4-vs-3 label trap), whatever ``skip_invalid`` says.
    """
    entries = list(entries)
    start = time.perf_counter()
    workers = max(1, min(int(num_workers or 0), os.cpu_count() or 1))
    reports = preflight(
        entries,
        workers,
        et_label=int(et_label),
        check_labels=check_labels,
        affine_tolerance=affine_tolerance,
        label_scheme=label_scheme,
    )
    verdict = _judge(entries, reports, int(et_label), check_labels, require_et)
    n_files = sum(len(e.get("image", [])) + bool(e.get("label")) for e in entries)
    errors = [p for p in verdict.problems if p.severity == "error"]
    logger.info(
        f"pre-flight: checked {len(entries)} case(s) ({n_files} files) in {time.perf_counter() - start:.1f} s with "
        f"{workers} process(es): {len(errors)} problem(s) in {verdict.n_bad} case(s)"
    )
    _stop_on_errors(
        verdict,
        len(entries),
        skip_invalid,
        "fix these files, or pass --skip_invalid true (skip_invalid=true) to go on without these cases",
    )
    if verdict.n_bad:
        logger.warning(
            f"skip_invalid: skipping {verdict.n_bad} of {len(entries)} case(s):\n"
            f"{format_problems(verdict.problems)}"
        )
    elif verdict.problems:
        logger.warning(f"pre-flight warnings (the cases are used):\n{format_problems(verdict.problems)}")
    if not verdict.good:
        raise DataError(f"no usable case left after skipping invalid ones:\n{format_problems(errors)}", errors)
    return verdict.good


def preflight_datalist(
    datalist: dict,
    et_label: int,
    skip_invalid: bool = False,
    num_workers: int = 0,
    fold: int | None = None,
    affine_tolerance: float = 1e-3,
    label_scheme: str | None = None,
) -> dict:
    """The pre-flight of training: ``check_datalist`` of every case of ``datalist`` (all folds, and the incomplete
    cases dataset discovery found), once, before any caching or epoch, with every problem in one list.

    Returns the datalist with only the usable training cases; with ``skip_invalid``, logs how many are left per fold.
    """
    training = list(datalist.get("training", []))
    incomplete = list(datalist.get("incomplete", []))
    if not training and not incomplete:
        return datalist  # no dataset yet: the config is being inspected; the run says what is missing
    usable = check_datalist(
        training + incomplete,
        et_label,
        skip_invalid=skip_invalid,
        num_workers=num_workers,
        affine_tolerance=affine_tolerance,
        label_scheme=label_scheme,
    )
    training_ids = {id(e) for e in training}
    good = [e for e in usable if id(e) in training_ids]
    if not good:
        raise DataError("no usable labeled case left after skipping invalid ones: fix the cases listed above")
    result = {**datalist, "training": good, "incomplete": []}
    if len(good) < len(training) + len(incomplete):
        folds = int(datalist.get("numFolds", 1 + max((int(e["fold"]) for e in good), default=0)))
        left = ", ".join(f"fold {k}: {sum(int(e['fold']) == k for e in good)}" for k in range(folds))
        logger.warning(f"cases left per fold: {left}" + (f" (validation fold {fold})" if fold is not None else ""))
    return result


# ---------------------------------------------------------------------------------------------------------------
# inference: the same checks on what the pipeline already loaded


def check_headers(case_id: str, images: Sequence[str], affine_tolerance: float = 1e-3) -> list[CaseProblem]:
    """Shapes and affines of a case's sequence files from their headers alone (no voxel data is read)."""
    images = [str(p) for p in ([images] if isinstance(images, (str, Path)) else images)]
    problems = check_layout(case_id, images)
    if problems:
        return problems
    grid = []
    for i, path in enumerate(images):
        image, _, read_problems = read_nifti(case_id, path, header_only=True)
        problems += read_problems
        if image is None:
            continue
        shape = tuple(int(s) for s in image.shape)
        if len(images) == _N:
            shape = shape[:3] if len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1) else shape
            if len(shape) != 3:
                problems.append(
                    CaseProblem(
                        case_id,
                        path,
                        f"{SEQUENCES[i]} has shape {shape}, expected one 3-D volume (X, Y, Z)",
                        f"give {_EXPECTED}",
                    )
                )
                continue
        affine = np.asarray(image.affine, dtype=np.float64)
        problems += check_affine(case_id, path, affine)
        grid.append((path, shape, affine))
    return problems + check_same_grid(case_id, grid, affine_tolerance)


def check_loaded_sequences(case_id: str, image: Any, source: str = "-", strict: bool = False) -> list[CaseProblem]:
    """The data checks of the pre-flight on a loaded ``(4, X, Y, Z)`` image (before normalisation): NaN/Inf, blank or
    constant sequences, empty brain. A blank sequence is a warning (the case is still segmented) unless ``strict``."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    problems: list[CaseProblem] = []
    content: list[CaseProblem] = []
    for name, channel in zip(SEQUENCES, array):
        problems += check_finite(case_id, source, channel, name)
        content += check_sequence_content(case_id, source, name, channel, "error" if strict else "warning")
    return problems + check_brain(case_id, source, content, len(array), True)


class CheckSequencesd:
    """Inference's per-case input check, as a dictionary transform placed right after loading: runs
    ``check_loaded_sequences`` on ``image`` (4, X, Y, Z) before normalisation, raises ``ValueError`` naming the case
    and every error (NaN/Inf, constant sequence, empty brain; a blank sequence with ``strict``), and stores the
    warnings in ``input_warnings`` (one per line) and the brain's voxel count (non-zero in any sequence) in ``brain_voxels``.
    """

    def __init__(self, keys: str = "image", strict: bool = False) -> None:
        self.key, self.strict = keys if isinstance(keys, str) else keys[0], bool(strict)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        image = d[self.key]
        meta = getattr(image, "meta", {}) or {}
        source = meta.get("filename_or_obj", "-")
        case_id = str(d.get("case_id") or Path(str(source)).name)
        problems = check_loaded_sequences(case_id, image, str(source), self.strict)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise ValueError("; ".join(f"{p.problem} -> {p.fix}" for p in errors))
        d["input_warnings"] = "\n".join(f"{p.problem} (input)" for p in problems)  # a string: collates in a DataLoader
        array = image.detach() if hasattr(image, "detach") else np.asarray(image)
        d["brain_voxels"] = int((array != 0).any(0).sum())
        return d
