"""BraTS evaluation: Dice, HD95, sensitivity and specificity of WT, TC and ET, per case and summarised.

Regions (from a label map; ``et`` is 4 for BraTS 2018-2021 and 3 for BraTS 2023+, and a prediction and its
reference may use different conventions, hence the separate ``pred_et_label`` / ``ref_et_label``):

- whole tumor ``wt`` = labels {1, 2, et}; tumor core ``tc`` = {1, et}; enhancing tumor ``et`` = {et}.

Label maps are checked: a value outside {0, 1, 2, et} raises a ``ValueError`` that names the values found, so
that ET written as 4 but read with ``et_label=3`` (or the reverse) cannot silently give an empty ET.

Per region, with ``P`` the predicted mask and ``R`` the reference mask, counts over the whole volume:

- **Dice**: MONAI's ``compute_dice(include_background=True, ignore_empty=False)``; 1 when both masks are empty,
  0 when exactly one is empty (the BraTS rule).
- **HD95** in millimetres, with the voxel spacing of the NIfTI header. Both empty: 0. Exactly one empty:
  ``BRATS_MAX_HD95`` = 373.13 mm (the value the BraTS platform reports, the diagonal of the 240x240x155 mm
  volume). Otherwise the surfaces are the boundary voxels of each mask (the voxels that a binary erosion with
  the 6-connected structure removes; MONAI's ``get_mask_edges``) and the distances are exact Euclidean
  distances in mm from every surface voxel of one mask to the nearest surface voxel of the other (MONAI's
  ``get_surface_distance``). Two published ways to turn those into one number:

  - ``hd95_mode="max_directed"`` (the default, the number this project reports): the larger of the two
    directed 95th percentiles, ``max(p95(d(P->R)), p95(d(R->P)))``. This is what MONAI's
    ``compute_hausdorff_distance(percentile=95)`` returns (the test suite checks the two agree) and the
    "robust Hausdorff" of DeepMind's ``surface-distance`` package (which, unlike this function, weights each
    surface element by its area).
  - ``hd95_mode="pooled"``: the 95th percentile of the distances of both directions pooled together,
    ``p95(d(P->R) U d(R->P))``; never larger than ``max_directed``.

  Percentiles interpolate linearly (``numpy.percentile``'s default, as ``torch.quantile`` in MONAI). For speed,
  both masks are first cropped to their joint bounding box plus one voxel, which changes no surface voxel.
- **Sensitivity** ``TP / (TP + FN)``. When the reference is empty this ratio is undefined; this module reports
  **1 when the prediction is empty too and 0 when it is not** (a false positive region, consistent with the
  Dice and HD95 rules for exactly one empty mask).
- **Specificity** ``TN / (TN + FP)`` over the whole volume (background included, hence values close to 1);
  1 when the reference has no background voxel.

``evaluate_folder`` writes the per-case table plus the summary rows mean, std (population, ``ddof=0``),
median, 25quantile and 75quantile to a CSV (the summary rows of the BraTS platform's result tables).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_mask_edges, get_surface_distance

from custom.io import atomic_path

__all__ = [
    "REGIONS",
    "BRATS_MAX_HD95",
    "HD95_MODES",
    "CSV_COLUMNS",
    "SUMMARY_ROWS",
    "labels_to_regions",
    "region_metrics",
    "case_metrics",
    "summarize",
    "evaluate_folder",
    "evaluate_entries",
]

REGIONS = ("wt", "tc", "et")
BRATS_MAX_HD95 = 373.13  # HD95 (mm) when exactly one of prediction / reference is empty
HD95_MODES = ("max_directed", "pooled")
METRICS = ("dice", "hd95", "sensitivity", "specificity")
CSV_COLUMNS = ["case_id"] + [f"{m}_{r}" for m in METRICS for r in REGIONS]
SUMMARY_ROWS = ("mean", "std", "median", "25quantile", "75quantile")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def labels_to_regions(labels: np.ndarray, et_label: int, check: bool = True) -> dict[str, np.ndarray]:
    """Boolean masks ``{"wt", "tc", "et"}`` of a BraTS label map whose enhancing tumor is ``et_label`` (4 or 3).

    With ``check`` (default) a value other than 0, 1, 2 and ``et_label`` raises a ``ValueError`` naming it.
    """
    labels = np.asarray(labels)
    et_label = int(et_label)
    if et_label in (0, 1, 2):
        raise ValueError(f"et_label must not be 0, 1 or 2 (BraTS uses 4, or 3 since 2023), got {et_label}.")
    ncr, ed, et = labels == 1, labels == 2, labels == et_label
    if check:
        bad = ~(ncr | ed | et | (labels == 0))
        if bad.any():
            found = np.unique(labels[bad]).tolist()
            raise ValueError(
                f"label values {found} are not BraTS labels for et_label={et_label} (expected 0, 1, 2, {et_label}); "
                "ET is 4 in BraTS 2018-2021 and 3 in BraTS 2023+: set the et_label of this file accordingly."
            )
    tc = ncr | et
    return {"wt": tc | ed, "tc": tc, "et": et}


def _joint_bbox(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``pred | ref`` grown by ``margin`` voxels (clipped); None when both are empty."""
    union = pred | ref
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        if idx.size == 0:
            return None
        slices.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, union.shape[axis])))
    return tuple(slices)


def _hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], hd95_mode: str) -> float:
    """HD95 in mm of two non-empty boolean masks (already cropped); see the module docstring."""
    edges_pred, edges_ref = get_mask_edges(pred, ref, crop=False)
    d_pred_to_ref = np.asarray(get_surface_distance(edges_pred, edges_ref, spacing=spacing), dtype=np.float64)
    d_ref_to_pred = np.asarray(get_surface_distance(edges_ref, edges_pred, spacing=spacing), dtype=np.float64)
    if hd95_mode == "pooled":
        return float(np.percentile(np.concatenate([d_pred_to_ref, d_ref_to_pred]), 95))
    return float(max(np.percentile(d_pred_to_ref, 95), np.percentile(d_ref_to_pred, 95)))


def region_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), hd95_mode: str = "max_directed"
) -> dict[str, float]:
    """``{"dice", "hd95", "sensitivity", "specificity"}`` of a binary prediction against a binary reference.

    ``spacing`` is the voxel size in mm along the array axes (``header.get_zooms()[:3]``); HD95 is in mm.
    Empty masks follow the BraTS rules of the module docstring.
    """
    if hd95_mode not in HD95_MODES:
        raise ValueError(f"hd95_mode must be one of {HD95_MODES}, got {hd95_mode!r}.")
    pred, ref = np.asarray(pred).astype(bool, copy=False), np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}.")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} must have one value per axis of the {pred.ndim}-D masks.")
    n_voxels = pred.size

    box = _joint_bbox(pred, ref)
    if box is None:  # both empty: nothing to find, nothing found
        p_crop, r_crop = pred[(slice(0, 1),) * pred.ndim], ref[(slice(0, 1),) * ref.ndim]
    else:
        p_crop, r_crop = pred[box], ref[box]
    tp = int(np.count_nonzero(p_crop & r_crop))
    n_pred, n_ref = int(np.count_nonzero(p_crop)), int(np.count_nonzero(r_crop))
    fp, fn = n_pred - tp, n_ref - tp
    tn = n_voxels - tp - fp - fn

    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]  # noqa: E731
    dice = float(compute_dice(as_tensor(p_crop), as_tensor(r_crop), include_background=True, ignore_empty=False))

    if n_pred == 0 and n_ref == 0:
        hd95 = 0.0
    elif n_pred == 0 or n_ref == 0:
        hd95 = BRATS_MAX_HD95
    else:
        hd95 = _hd95(p_crop, r_crop, spacing, hd95_mode)

    if n_ref == 0:
        sensitivity = 1.0 if n_pred == 0 else 0.0
    else:
        sensitivity = tp / (tp + fn)
    specificity = tn / (tn + fp) if (tn + fp) > 0 else 1.0
    return {"dice": dice, "hd95": hd95, "sensitivity": float(sensitivity), "specificity": float(specificity)}


def case_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    pred_et_label: int = 4,
    ref_et_label: int = 4,
    hd95_mode: str = "max_directed",
) -> dict[str, float]:
    """Metrics of one case from two BraTS label maps: keys ``dice_wt, dice_tc, dice_et, hd95_wt, ...,
    sensitivity_*, specificity_*`` (the order of ``CSV_COLUMNS``). Each map has its own ET label value."""
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape}.")
    try:
        pred_regions = labels_to_regions(pred_labels, pred_et_label)
    except ValueError as e:
        raise ValueError(f"prediction: {e}") from None
    try:
        ref_regions = labels_to_regions(ref_labels, ref_et_label)
    except ValueError as e:
        raise ValueError(f"reference: {e}") from None
    per_region = {r: region_metrics(pred_regions[r], ref_regions[r], spacing, hd95_mode) for r in REGIONS}
    return {f"{m}_{r}": per_region[r][m] for m in METRICS for r in REGIONS}


def summarize(rows: list[dict]) -> list[dict]:
    """Summary rows ``mean, std, median, 25quantile, 75quantile`` of per-case metric rows.

    The name of each statistic is in the ``case_id`` column; std is the population one (``ddof=0``); the
    quantiles interpolate linearly. With no rows every value is NaN.
    """
    keys = CSV_COLUMNS[1:]
    values = {k: np.array([float(row[k]) for row in rows], dtype=np.float64) for k in keys}
    stats = {
        "mean": np.mean,
        "std": np.std,
        "median": np.median,
        "25quantile": lambda v: np.percentile(v, 25),
        "75quantile": lambda v: np.percentile(v, 75),
    }
    out = []
    for name in SUMMARY_ROWS:
        row: dict = {"case_id": name}
        for k in keys:
            row[k] = float(stats[name](values[k])) if values[k].size else float("nan")
        out.append(row)
    return out


def _strip_nifti(name: str) -> str | None:
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _flat_niftis(folder: Path) -> dict[str, Path]:
    """``{case_id: file}`` of the NIfTI files directly in ``folder`` (``.nii.gz`` preferred over ``.nii``)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = _strip_nifti(path.name)
        if stem is None or path.name.startswith(".") or not path.is_file():  # hidden: macOS "._" forks
            continue
        if stem not in found or path.name.endswith(".nii.gz"):
            found[stem] = path
    return found


def _flat_references(ref_dir: Path) -> dict[str, Path]:
    """References of a flat folder: ``<case_id>.nii.gz`` (``<case_id>-seg`` / ``_seg`` accepted too)."""
    refs: dict[str, Path] = {}
    for stem, path in _flat_niftis(ref_dir).items():
        for suffix in ("-seg", "_seg"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        refs[stem] = path
    return refs


def _dataset_references(ref_dir: Path) -> tuple[dict[str, tuple[Path, int | None]], str]:
    """References of a BraTS dataset folder through ``custom.data.discover_cases``; empty when unusable."""
    try:
        from custom.data import discover_cases  # imported lazily: evaluation works without it
    except ImportError as e:
        return {}, f"custom.data.discover_cases unavailable ({e})"
    try:
        cases = discover_cases(str(ref_dir))
    except Exception as e:  # not a dataset folder (e.g. a flat folder of labels): fall back to flat matching
        return {}, f"discover_cases({ref_dir}) failed: {e}"
    refs = {}
    for case in cases:
        label = getattr(case, "label", None)
        if label:
            refs[str(case.case_id)] = (Path(label), getattr(case, "et_label", None))
    return refs, "" if refs else f"discover_cases({ref_dir}) found no case with a label"


def _load_labels(path: Path) -> tuple[np.ndarray, tuple[float, ...], tuple[str, ...]]:
    """Label array, spacing (mm) and orientation codes of a NIfTI label map; non-integer values raise."""
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"{path} has shape {img.shape}; a BraTS label map is 3-D.")
    data = np.asanyarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError(f"{path} holds non-integer values; expected a label map.")
        data = rounded.astype(np.int16)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, spacing, tuple(nib.aff2axcodes(img.affine))


def _write_csv_atomic(rows: list[dict], output_csv: Path) -> None:
    with atomic_path(output_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def evaluate_folder(
    pred_dir: str,
    ref_dir: str,
    output_csv: str,
    et_label: int = 4,
    ref_et_label: int | None = None,
    hd95_mode: str = "max_directed",
) -> list[dict]:
    """Evaluate the predictions ``<pred_dir>/<case_id>.nii.gz`` (or ``.nii``) against the references of ``ref_dir``.

    ``ref_dir`` is a BraTS dataset folder (cases found with ``custom.data.discover_cases``, label files and their
    ET convention taken from it) or a flat folder of ``<case_id>.nii.gz`` label maps. ``et_label`` is the ET value
    of the predictions; ``ref_et_label`` that of the references (None: the dataset's own, or ``et_label`` for a
    flat folder). Spacing comes from the reference header.

    Every reference case is evaluated or reported: a missing prediction, a shape / spacing / orientation
    mismatch or invalid labels make that case a failure, the other cases are still evaluated. Writes
    ``output_csv`` (atomically) with ``CSV_COLUMNS``: one row per evaluated case, then the summary rows
    ``mean, std, median, 25quantile, 75quantile``; prints a one-line summary; then raises a ``RuntimeError``
    listing the failed cases, if any. Returns the per-case rows followed by the summary rows.
    """
    if hd95_mode not in HD95_MODES:
        raise ValueError(f"hd95_mode must be one of {HD95_MODES}, got {hd95_mode!r}.")
    pred_path, ref_path = Path(pred_dir), Path(ref_dir)
    if not pred_path.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_path} does not exist.")
    if not ref_path.is_dir():
        raise FileNotFoundError(f"reference folder {ref_path} does not exist.")

    references, why_not_dataset = _dataset_references(ref_path)
    if not references:
        references = {case_id: (path, None) for case_id, path in _flat_references(ref_path).items()}
    if not references:
        detail = f" ({why_not_dataset})" if why_not_dataset else ""
        raise FileNotFoundError(
            f"no reference label maps in {ref_path}: expected a BraTS dataset folder or <case_id>.nii.gz files{detail}."
        )
    return _evaluate_references(references, pred_path, Path(output_csv), et_label, ref_et_label, hd95_mode)


def evaluate_entries(
    entries: list[dict], pred_dir: str, output_csv: str, et_label: int = 4, hd95_mode: str = "max_directed"
) -> list[dict]:
    """Evaluate ``<pred_dir>/<case_id>.nii.gz`` against the ``label`` files of datalist entries (one fold's
    validation cases); both use ``et_label``. Same output, failure handling and return value as ``evaluate_folder``."""
    if hd95_mode not in HD95_MODES:
        raise ValueError(f"hd95_mode must be one of {HD95_MODES}, got {hd95_mode!r}.")
    references = {str(e["case_id"]): (Path(e["label"]), et_label) for e in entries if e.get("label")}
    if not references:
        raise ValueError("no labelled cases to evaluate: the entries have no `label` files.")
    return _evaluate_references(references, Path(pred_dir), Path(output_csv), et_label, None, hd95_mode)


def _evaluate_references(
    references: dict[str, tuple[Path, int | None]],
    pred_path: Path,
    output_csv: Path,
    et_label: int,
    ref_et_label: int | None,
    hd95_mode: str,
) -> list[dict]:
    predictions = _flat_niftis(pred_path) if pred_path.is_dir() else {}

    rows: list[dict] = []
    failures: list[str] = []
    for case_id in sorted(references):
        ref_file, case_et = references[case_id]
        r_et = ref_et_label if ref_et_label is not None else (case_et if case_et is not None else et_label)
        pred_file = predictions.get(case_id)
        if pred_file is None:
            failures.append(f"{case_id}: no prediction {pred_path / (case_id + '.nii.gz')} (reference {ref_file})")
            continue
        try:
            pred, pred_spacing, pred_axes = _load_labels(pred_file)
            ref, spacing, ref_axes = _load_labels(ref_file)
            if pred.shape != ref.shape:
                raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
            if not np.allclose(pred_spacing, spacing, rtol=1e-3, atol=1e-4):
                raise ValueError(f"prediction spacing {pred_spacing} mm differs from reference spacing {spacing} mm")
            if pred_axes != ref_axes:
                raise ValueError(
                    f"prediction orientation {''.join(pred_axes)} differs from reference {''.join(ref_axes)}"
                )
            row = {"case_id": case_id}
            row.update(case_metrics(pred, ref, spacing, pred_et_label=et_label, ref_et_label=r_et, hd95_mode=hd95_mode))
        except Exception as e:  # one bad case must not stop the others
            failures.append(f"{case_id}: {e} (prediction {pred_file}, reference {ref_file})")
            continue
        rows.append(row)

    extra = sorted(set(predictions) - set(references))
    if extra:
        print(f"note: {len(extra)} prediction(s) without a reference, not evaluated: {', '.join(extra)}")

    table = rows + summarize(rows)
    _write_csv_atomic(table, output_csv)
    if rows:
        mean = table[len(rows)]
        means = ", ".join(f"{r.upper()} {mean[f'dice_{r}']:.4f}" for r in REGIONS)
        print(f"{len(rows)} case(s) evaluated, mean Dice {means}; {len(failures)} failed; written to {output_csv}")
    else:
        print(f"0 cases evaluated; {len(failures)} failed; written to {output_csv}")
    if failures:
        print("failed cases:\n  " + "\n  ".join(failures))
        raise RuntimeError(f"{len(failures)} case(s) could not be evaluated:\n  " + "\n  ".join(failures))
    return table
