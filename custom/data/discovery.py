"""Discovery of BraTS cases on disk: which files make which case, in every BraTS layout.

Supported layouts, searched recursively under ``dataset_dir`` (``.nii.gz`` or ``.nii``):

* BraTS 2018/2019: ``HGG/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` and ``LGG/...``; the same naming
  without HGG/LGG folders (2019 validation set), BraTS 2020 (``BraTS20_Training_001``) and 2021
  (``BraTS2021_00000``). Enhancing tumour is label 4.
* BraTS 2023+ (GLI, MEN, MET, PED, SSA, ...): ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``. Enhancing tumour is
  label 3.
* A folder of single 4-channel NIfTI files ``<case>.nii.gz`` (channels T1, T1c, T2, FLAIR, first or last axis),
  labels as ``<case>_seg.nii.gz`` next to them or as ``<case>.nii.gz`` in another folder (``labels/``,
  ``labelsTr/``). The channel order is not recorded in a NIfTI file: a Medical Segmentation Decathlon
  Task01 file (FLAIR, T1, T1gd, T2) must be re-ordered first.

"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from custom.core.errors import CaseProblem, DataError, DatasetNotFound
from custom.core.naming import NAMINGS_LOOKED_FOR, SEQUENCES, is_four_channel, nifti_stem, parse_stem

__all__ = ["BratsCase", "discover_cases"]

logger = logging.getLogger(__name__)


@dataclass
class BratsCase:
    """One case found on disk.

    ``images`` holds the four sequence files in ``SEQUENCES`` order, or a single 4-channel file.
    ``label`` is ``None`` for unlabeled (validation/test) cases. ``et_label`` is the enhancing-tumour value the
    naming implies (4 for 2018-2021 naming, 3 for 2023+). ``group`` is ``"HGG"``/``"LGG"`` for 2018/2019 layouts.
    """

    case_id: str
    images: list[str]
    label: str | None
    et_label: int
    group: str | None = None


def _walk_nifti(root: Path):
    """Yield every NIfTI file under ``root`` (following symbolic links once), in a deterministic order."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link cycle
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):  # hidden files, macOS "._" resource forks shipped in BraTS archives
                continue
            stem = nifti_stem(name)
            if stem is not None:
                yield Path(dirpath) / name, stem


def _group_of(path: Path) -> str | None:
    """``"HGG"``/``"LGG"`` when a folder of ``path`` is named so (nearest folder wins)."""
    for part in reversed(path.parent.parts):
        if part.upper() in ("HGG", "LGG"):
            return part.upper()
    return None


def _header_shape(path: Path) -> tuple[int, ...] | None:
    """Image shape read from the header only (no voxel data), None when the file is unreadable."""
    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal for discovery
        logger.warning("skipping %s: not a readable NIfTI header (%s)", path, e)
        return None


def discover_cases(
    dataset_dir: str, allow_incomplete: bool = False, incomplete_cases: dict[str, str] | None = None
) -> list[BratsCase]:
    """Find the BraTS cases under ``dataset_dir`` (any supported naming), sorted by case id.

    A case that has some but not all four sequences raises a ``ValueError`` that lists every such case, the
    missing sequences and its folder; with ``allow_incomplete=True`` those cases are skipped with a warning and,
    when ``incomplete_cases`` is given, recorded there as ``{case_id: what is wrong}`` (inference reports them).
    """
    root = Path(dataset_dir).expanduser()
    if not root.exists():
        raise DatasetNotFound(
            f"dataset_dir {str(root)!r} does not exist; set dataset_dir to a folder of BraTS cases or a datalist JSON"
        )
    if not root.is_dir():
        raise DataError(f"dataset_dir {str(root)!r} is not a folder; give a folder of BraTS cases or a datalist JSON")
    root = root.resolve()

    slots: dict[str, dict[str, Path]] = {}  # case id -> {"t1"|...|"label"|"image4d": path}
    naming: dict[str, int] = {}  # case id -> et label implied by the naming
    duplicates: list[str] = []
    unmatched: list[tuple[Path, str]] = []

    def put(case_id: str, key: str, path: Path, et_label: int) -> None:
        case = slots.setdefault(case_id, {})
        if key in case and case[key] != path:
            duplicates.append(f"{case_id} {key}: {case[key]} and {path}")
            return
        case[key] = path
        naming.setdefault(case_id, et_label)

    for path, stem in _walk_nifti(root):
        parsed = parse_stem(stem)
        if parsed:
            put(*parsed[:2], path, parsed[2])
            continue
        unmatched.append((path, stem))

    # single 4-channel files first, then 3-D files named like one of them are its label (labels/<case>.nii.gz)
    label_candidates: list[tuple[Path, str]] = []
    for path, stem in unmatched:
        shape = _header_shape(path)
        if shape is None:
            continue
        if is_four_channel(shape):
            put(stem, "image4d", path, 4)
        elif len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1):
            label_candidates.append((path, stem))
        else:
            logger.warning(
                "skipping %s: shape %s is neither a 3-D volume nor 4 channels (T1, T1c, T2, FLAIR) first or last",
                path,
                shape,
            )
    for path, stem in label_candidates:
        case = slots.get(stem)
        if case is not None and "image4d" in case and "label" not in case:
            case["label"] = path

    if duplicates:
        raise DataError(
            "the same case and sequence was found more than once under "
            f"{root}; keep one copy of each:\n  " + "\n  ".join(duplicates)
        )

    cases: list[BratsCase] = []
    incomplete: dict[str, str] = {}  # case id -> what is wrong
    for case_id in sorted(slots):
        files = slots[case_id]
        present = [s for s in SEQUENCES if s in files]
        label = str(files["label"]) if "label" in files else None
        first = next(iter(files.values()))
        if "image4d" in files:
            if present:
                incomplete[case_id] = (
                    f"both a 4-channel file and separate sequence files ({', '.join(present)}) "
                    f"in {files['image4d'].parent}; keep one form"
                )
                continue
            images = [str(files["image4d"])]
        elif len(present) == len(SEQUENCES):
            images = [str(files[s]) for s in SEQUENCES]
        else:
            missing = [s for s in SEQUENCES if s not in files]
            incomplete[case_id] = f"missing {', '.join(missing)} in {first.parent}"
            continue
        cases.append(BratsCase(case_id, images, label, naming[case_id], _group_of(first)))

    if incomplete:
        problems = [
            CaseProblem(
                case_id,
                str(slots[case_id][next(iter(slots[case_id]))].parent),
                problem,
                "add the missing sequence files, or remove the case",
                kind="incomplete",
            )
            for case_id, problem in incomplete.items()
        ]
        lines = [f"{case_id}: {problem}" for case_id, problem in incomplete.items()]
        if not allow_incomplete:
            raise DataError(
                f"{len(incomplete)} incomplete case(s) under {root} (every case needs T1, T1c, T2 and FLAIR):\n  "
                + "\n  ".join(lines)
                + "\ncomplete or remove them (training: --skip_invalid true skips them; "
                "python -m custom datalist: --allow_incomplete true)",
                problems,
            )
        if incomplete_cases is not None:  # the caller reports them (pre-flight, inference summary)
            incomplete_cases.update(incomplete)
        else:
            logger.warning("skipping %d incomplete case(s):\n  %s", len(incomplete), "\n  ".join(lines))
    if not cases:
        raise DataError(f"no BraTS cases found under {root}; looked for {NAMINGS_LOOKED_FOR}")
    return cases
