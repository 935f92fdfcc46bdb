"""Checks of the input files before training or inference, with every problem of every case reported at once.

One small function per check; ``inspect_case`` runs them on one datalist entry (``{"case_id", "image": [t1, t1c,
t2, flair] | 4-channel file, "label"}``), ``preflight`` on many cases (in worker processes when asked) and
``preflight_datalist`` on a whole dataset before training: all folds, training and validation together,
incomplete cases included. The checks:

- the entry lists 4 sequence files (or one file with 4 channels first or last), each file once;
- every file exists and reads as NIfTI, voxel data included, so a truncated ``.nii.gz`` is caught;
- one spatial shape and one finite affine for all files of the case (label included);
- no NaN/Inf voxel; no sequence that is zero everywhere or one constant value; a non-empty brain;
- a prepared scan: a zero background (not the whole field of view non-zero: skull-stripped) and the four brain
  masks in agreement (Dice >= ``MASK_DICE``: co-registered), else an error saying to run the BraTS preprocessing;
- a plausible channel order (``custom.data.plausibility``): a warning naming the likely order, an error with
  ``strict``;
- label values in {0, 1, 2, ``et_label``} (and 4, resection cavity, with ``label_scheme brats2024``; the decathlon's
  1, 2, 3 with ``label_scheme msd``).

Affines are compared as the loader compares them (MONAI's ``LoadImaged`` stacking the sequence files: ``np.allclose``,
each element within ``1e-8 + 1e-5 |reference|``), so that a case passing here never fails there.

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
from custom.core.labels import SCHEMES, allowed_labels, distinct_values, get_scheme
from custom.core.naming import (
    CHANNEL_INDEX_KEY,
    SEQUENCE_NAMES,
    SEQUENCES,
    OrderSequencesd,
    is_four_channel,
    split_channels,
)
from custom.data.plausibility import check_channel_order

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
    "check_prepared",
    "check_sequence_order",
    "locate_read_error",
    "CheckSequencesd",
    "AFFINE_RTOL",
    "AFFINE_ATOL",
    "MASK_DICE",
]

logger = logging.getLogger(__name__)

_N = len(SEQUENCES)
_EXPECTED = "4 sequence files (T1, T1c, T2, FLAIR) or one 4-channel file of shape (X, Y, Z, 4) or (4, X, Y, Z)"
_REGRID = "resample/co-register all sequences and the label onto one grid (same shape and affine)"
_RC_LABEL = SCHEMES["brats2024"].rc_label  # resection cavity in BraTS 2024+ post-treatment data (with ET 3)
# the affine test of MONAI's image readers when LoadImaged stacks files (np.allclose's defaults): ours is the same
AFFINE_RTOL, AFFINE_ATOL = 1e-5, 1e-8
MASK_DICE = 0.9  # brain masks (non-zero voxels) of two sequences of one case agree at least this much
FOV_FRACTION = 0.5  # at most this fraction of the volume's outer faces is non-zero in a skull-stripped scan
_PREPROCESS = (
    "run the BraTS preprocessing first: co-register the four sequences (to one another and the SRI-24 atlas) and "
    "skull-strip them, e.g. with the BrainLesion package brainles-preprocessing (pip install brainles-preprocessing)"
)
_KEEP_FULL = 4_000_000  # volumes up to this many voxels are kept whole for the case-level checks, larger ones at 1/8


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


def _affines_differ(affine: np.ndarray, reference: np.ndarray, affine_tolerance: float | None) -> bool:
    """The loader's test (``np.allclose(affine, reference)``, MONAI's), plus ``affine_tolerance`` (mm, absolute)
    when given: never looser than what the loader accepts."""
    if not np.allclose(affine, reference, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        return True
    return affine_tolerance is not None and float(np.max(np.abs(affine - reference))) > float(affine_tolerance)


def check_same_grid(
    case_id: str, volumes: Sequence[tuple[str, tuple[int, ...], np.ndarray]], affine_tolerance: float | None = None
) -> list[CaseProblem]:
    """Every ``(path, spatial shape, affine)`` equals the first one's shape and affine, the affine as the loader
    compares them (``np.allclose`` with rtol 1e-5, atol 1e-8, as MONAI's ``LoadImaged`` does when it stacks the
    files); ``affine_tolerance`` (absolute) can only make it stricter."""
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
        if _affines_differ(affine, ref_affine, affine_tolerance):
            diff = float(np.max(np.abs(affine - ref_affine)))
            allowed = f"the loader accepts {AFFINE_ATOL:g} + {AFFINE_RTOL:g} x |value| per element"
            if affine_tolerance is not None:
                allowed += f", and at most {affine_tolerance:g} here"
            problem = f"affine differs from that of {ref_path} by up to {diff:.4g} ({allowed})"
            problems.append(CaseProblem(case_id, path, problem, _REGRID, kind="grid"))
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
    if label_scheme and get_scheme(label_scheme).name == "msd":
        fix = "labels must be 0 background, 1 edema, 2 non-enhancing tumor, 3 enhancing tumour (decathlon labels)"
    else:
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


def check_stackable(case_id: str, images: Sequence[str], ndims: Sequence[int | None]) -> list[CaseProblem]:
    """4 sequence files must all be 3-D or all ``(X, Y, Z, 1)``: the loader stacks files of one shape only, and a
    mix stops it with a NumPy error that names no file."""
    known = [n for n in ndims if n is not None]
    if len(set(known)) <= 1:
        return []
    return [
        CaseProblem(
            case_id,
            path,
            f"{SEQUENCES[i]} is stored as (X, Y, Z, 1) while other sequences are 3-D: the loader cannot stack them",
            "save it as a 3-D volume (e.g. nibabel: nib.squeeze_image(nib.load(path)).to_filename(path))",
            kind="layout",
        )
        for i, (path, n) in enumerate(zip(images, ndims))
        if n == 4
    ]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def check_prepared(case_id: str, path: str, volumes: Sequence[np.ndarray]) -> list[CaseProblem]:
    """A scan prepared as BraTS prepares them: skull-stripped (a zero background: the non-zero "brain" does not fill
    the field of view, measured on the volume's six outer faces, where a stripped brain leaves zeros) and
    co-registered (the brain masks, non-zero voxels, of every two sequences agree with a Dice >= ``MASK_DICE``; BraTS
    cases give 1.0). Errors saying to run the preprocessing (``_PREPROCESS``)."""
    if len(volumes) != _N:
        return []
    masks = [np.asarray(v) != 0 for v in volumes]
    unstripped = []
    for name, mask in zip(SEQUENCE_NAMES, masks):
        faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
        on_faces = sum(int(f.sum()) for f in faces) / max(1, sum(f.size for f in faces))
        if on_faces > FOV_FRACTION and mask.mean() > 0.9:
            unstripped.append(f"{name} {100 * mask.mean():.0f} % ({100 * on_faces:.0f} % of the outer faces)")
    if unstripped:
        problem = (
            f"non-zero voxels fill the field of view ({', '.join(unstripped)}): the scan is not skull-stripped, or "
            "its background is not 0 (a BraTS scan is exactly 0 outside the brain)"
        )
        return [CaseProblem(case_id, path, problem, _PREPROCESS, kind="unprepared")]
    problems = []
    worst, pair = 1.0, (0, 0)
    for i in range(_N):
        for j in range(i + 1, _N):
            dice = _dice(masks[i], masks[j])
            if dice < worst:
                worst, pair = dice, (i, j)
    if worst < MASK_DICE:
        a, b = SEQUENCE_NAMES[pair[0]], SEQUENCE_NAMES[pair[1]]
        problem = (
            f"the brain masks (non-zero voxels) of {a} and {b} overlap with a Dice of {worst:.2f} (< {MASK_DICE}): "
            "the sequences are not co-registered"
        )
        problems.append(CaseProblem(case_id, path, problem, _PREPROCESS, kind="unprepared"))
    return problems


def check_sequence_order(
    case_id: str, path: str, volumes: Sequence[np.ndarray], strict: bool = False
) -> list[CaseProblem]:
    """The channel-order plausibility check (``custom.data.plausibility``) as a problem: a warning naming the likely
    order, an error with ``strict``; nothing when the order is plausible or cannot be judged."""
    if len(volumes) != _N:
        return []
    verdict = check_channel_order(volumes)
    if verdict is None or verdict.plausible:
        return []
    fix = (
        f"check which file holds which sequence; give them in the order {', '.join(SEQUENCE_NAMES)} (a decathlon "
        "dataset.json names them in its 'modality' map)" + ("" if strict else "; the case is used as given")
    )
    return [CaseProblem(case_id, path, verdict.message, fix, "error" if strict else "warning", kind="channel_order")]


def locate_read_error(case_id: str, images: Any) -> list[CaseProblem]:
    """The files of ``images`` whose voxel data cannot be read (a truncated ``.nii.gz``), each named: for a caller
    whose loader failed with an error that names no file (``EOFError: Compressed file ended ...``)."""
    images = [images] if isinstance(images, (str, Path)) else list(images or [])
    problems = []
    for path in images:
        problems += read_nifti(case_id, str(path))[2]
    return problems


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


def _kept(volume: np.ndarray) -> np.ndarray:
    """What the case-level checks (prepared scan, channel order) keep of a sequence: the volume, or every 2nd voxel
    on each axis of a large one (a copy: 1/8 of the memory)."""
    return volume if volume.size <= _KEEP_FULL else np.array(volume[::2, ::2, ::2])


def _channel_index(case_id: str, path: str, entry: dict) -> tuple[list[int] | None, list[CaseProblem]]:
    index = entry.get(CHANNEL_INDEX_KEY)
    if index is None:
        return None, []
    try:
        index = [int(i) for i in index]
    except (TypeError, ValueError):
        index = []
    if sorted(index) != list(range(_N)):
        problem = f"{CHANNEL_INDEX_KEY} {entry.get(CHANNEL_INDEX_KEY)!r} is not an order of the channels 0-3"
        fix = "give, for T1, T1c, T2, FLAIR, the channel of the file that holds it (e.g. [1, 2, 3, 0])"
        return None, [CaseProblem(case_id, path, problem, fix, kind="layout")]
    return index, []


def inspect_case(
    entry: dict,
    et_label: int = 4,
    check_labels: bool = True,
    affine_tolerance: float | None = None,
    label_scheme: str | None = None,
    blank_severity: str = "error",
    strict: bool = False,
) -> CaseReport:
    """Runs every check on one datalist entry, reading each file once; never raises for bad data. ``strict`` makes an
    implausible channel order an error (else a warning). A 4-channel file is read in the order of the entry's
    ``channel_index`` (decathlon files), as the loading transforms do."""
    case_id = _case_id(entry)
    report = CaseReport(case_id)
    if isinstance(entry, dict) and entry.get("error"):  # found incomplete by dataset discovery
        report.problems.append(
            CaseProblem(
                case_id,
                entry.get("folder", "-"),
                entry["error"],
                entry.get("fix", "complete or remove the case"),
                kind="incomplete",
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
    kept: list[np.ndarray] = []  # the 4 sequences (T1, T1c, T2, FLAIR) for the case-level checks
    ndims: list[int | None] = []
    index, problems = _channel_index(case_id, images[0], entry) if len(images) == 1 else (None, [])
    report.problems += problems
    for i, path in enumerate(images):
        image, data, problems = read_nifti(case_id, path)
        report.problems += problems
        ndims.append(None if data is None else data.ndim)
        if image is None:
            all_read = False
            continue
        if len(images) == 1:
            channels, problems = _split_channels(case_id, path, data)
            if channels is not None and index is not None:
                channels = [channels[k] for k in index]
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
            kept.append(_kept(channel))
            n_sequences += 1
        del data, channels
    if len(images) == _N:
        report.problems += check_stackable(case_id, images, ndims)
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
    usable = len(kept) == _N and not report.errors and not content and len({k.shape for k in kept}) == 1
    if usable:  # the case-level checks need the 4 sequences on one grid, each with an image
        report.problems += _case_level_checks(case_id, images[0], kept, strict)
    return report


def _case_level_checks(case_id: str, path: str, volumes: Sequence[np.ndarray], strict: bool) -> list[CaseProblem]:
    """Prepared scan (skull-stripped, co-registered), then, on a prepared one, the channel order."""
    prepared = check_prepared(case_id, path, volumes)
    return prepared or check_sequence_order(case_id, path, volumes, strict)


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
    entries: list[dict], et_label: int, check_labels: bool = True, affine_tolerance: float | None = None, **kwargs
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
    affine_tolerance: float | None = None,
    num_workers: int = 0,
    label_scheme: str | None = None,
    strict: bool = False,
) -> list[dict]:
    """Validate ``entries`` and return the usable ones; ``DataError`` (with the ``CaseProblem`` list) otherwise.

    With problems, ``skip_invalid=False`` raises listing all of them; ``skip_invalid=True`` logs them as a warning and
    returns only the good entries. With ``check_labels`` and ``require_et``, a set of labeled entries none of which
    contains ``et_label`` raises (the 4-vs-3 label trap), whatever ``skip_invalid`` says. ``strict``: an implausible
    channel order is an error, not a warning.
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
        strict=bool(strict),
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
    affine_tolerance: float | None = None,
    label_scheme: str | None = None,
    strict: bool = False,
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
        strict=strict,
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


def check_headers(case_id: str, images: Sequence[str], affine_tolerance: float | None = None) -> list[CaseProblem]:
    """Shapes and affines of a case's sequence files from their headers alone (no voxel data is read)."""
    images = [str(p) for p in ([images] if isinstance(images, (str, Path)) else images)]
    problems = check_layout(case_id, images)
    if problems:
        return problems
    grid = []
    ndims: list[int | None] = []
    for i, path in enumerate(images):
        image, _, read_problems = read_nifti(case_id, path, header_only=True)
        problems += read_problems
        ndims.append(None if image is None else len(image.shape))
        if image is None:
            continue
        shape = tuple(int(s) for s in image.shape)
        if len(images) == 1:
            if not is_four_channel(shape):
                problems.append(CaseProblem(case_id, path, f"one file of shape {shape}", f"give {_EXPECTED}"))
                continue
            shape = shape[:3] if shape[0] != _N or shape[-1] == _N else shape[1:]
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
    if len(images) == _N:
        problems += check_stackable(case_id, images, ndims)
    return problems + check_same_grid(case_id, grid, affine_tolerance)


def check_loaded_sequences(case_id: str, image: Any, source: str = "-", strict: bool = False) -> list[CaseProblem]:
    """The data checks of the pre-flight on a loaded ``(4, X, Y, Z)`` image (before normalisation): NaN/Inf, blank or
    constant sequences, empty brain, a prepared scan (skull-stripped, co-registered) and a plausible channel order. A
    blank sequence and an implausible order are warnings (the case is still segmented) unless ``strict``."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    problems: list[CaseProblem] = []
    content: list[CaseProblem] = []
    for name, channel in zip(SEQUENCES, array):
        problems += check_finite(case_id, source, channel, name)
        content += check_sequence_content(case_id, source, name, channel, "error" if strict else "warning")
    problems += check_brain(case_id, source, content, len(array), True)
    if len(array) == _N and not problems:
        problems += _case_level_checks(case_id, source, [_kept(channel) for channel in array], strict)
    return problems


class CheckSequencesd:
    """Inference's per-case input check, as a dictionary transform placed right after loading: puts the channels in
    the order T1, T1c, T2, FLAIR when the entry has a ``channel_index`` not yet applied (decathlon files:
    ``custom.core.naming.OrderSequencesd``), runs ``check_loaded_sequences`` on ``image`` (4, X, Y, Z) before
    normalisation, raises ``ValueError`` naming the case and every error (NaN/Inf, constant sequence, empty brain, a
    scan not skull-stripped or not co-registered; a blank sequence or an implausible channel order with ``strict``),
    and stores the warnings in ``input_warnings`` (one per line) and the brain's voxel count (non-zero in any
    sequence) in ``brain_voxels``.
    """

    def __init__(self, keys: str = "image", strict: bool = False) -> None:
        self.key, self.strict = keys if isinstance(keys, str) else keys[0], bool(strict)

    def __call__(self, data: dict) -> dict:
        d = OrderSequencesd(self.key)(data)
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
